"""Colocated pushes where actor TP == rollout TP: TP-split weights travel as per-rank blocks, or not at all.

A vLLM TP rank's weight loader reads only block `tp_rank` of a column/row-parallel weight (of tp equal blocks
along the split dim), and the same global rank's Megatron shard holds exactly that block wherever the mapping
places the rank's rows there (derived from the mapping: `models/layout.py`). Such a "block" tensor is never
assembled: a rank of the owning pipeline stage writes its own block into its bucket from its shard, a rank of
another stage receives only its block, point to point from the owning stage's rank with the same TP rank (DP rank
0). The rest of the bucket view is filled with NaN, so a loader that read outside its block would serve NaN
logprobs instead of silently wrong weights.

Kinds (one per HF tensor, agreed by all ranks through the plan): None = assembled and broadcast (sync/actor.py);
"whole" = replicated in the actor and read whole by the engine; an int d = block along dim d.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from spark_megatron.sync.manifest import aligned


def block_kind(job, tp: int, engine_tp: int, engine_reads: Optional[Callable]):
    """How one HFJob reaches a colocated engine (see the module doc)."""
    if engine_reads is None or tp != engine_tp:
        return None
    if job.mapping.tp_dim is None or tp == 1:  # every TP rank holds the whole tensor
        if job.layout is None:
            return None
        return "whole" if tp == 1 or engine_reads(job.spec.name) == "whole" else None
    rule = engine_reads(job.spec.name)
    if not isinstance(rule, int) or isinstance(rule, bool) or job.layout is None or job.layout.dim != rule:
        return None
    length = job.spec.shape[rule]
    if length % tp:
        return None
    size = length // tp
    for rank in range(tp):
        segs = sorted((s for s in job.layout.segments if s.rank == rank), key=lambda s: s.dst)
        pos = rank * size
        for seg in segs:
            if seg.dst != pos:
                return None
            pos += seg.length
        if pos != (rank + 1) * size:
            return None
    return rule


def block_range(kind, spec, tp: int, tp_rank: int) -> tuple:
    """(dim, start, length) of TP rank `tp_rank`'s block of a tensor of kind `kind`."""
    if kind == "whole":
        return 0, 0, spec.shape[0] if spec.shape else 1
    size = spec.shape[kind] // tp
    return kind, tp_rank * size, size


def _block_view(view: torch.Tensor, kind, spec, tp: int, tp_rank: int) -> torch.Tensor:
    if kind == "whole" or not spec.shape:
        return view
    dim, start, length = block_range(kind, spec, tp, tp_rank)
    return view.narrow(dim, start, length)


def fill_own_block(job, view: torch.Tensor, kind, tp_rank: int) -> None:
    """Write this rank's block of `job`'s HF tensor into `view` from the rank's shard (rest: NaN)."""
    if kind != "whole" and view.is_floating_point():
        view.fill_(float("nan"))
    for seg in job.layout.segments:
        if kind == "whole" or seg.rank == tp_rank:
            job.copy_runs(seg, view.narrow(job.layout.dim, seg.dst, seg.length))


def staging_need(plan, kinds: dict, tp: int) -> int:
    """Staging bytes for blocks that are not contiguous in their bucket view (dim > 0): a bucket's such blocks
    together, up to the largest HF tensor of the plan (the tensor-in-hand allowance; larger sets go in waves)."""
    largest = max((aligned(s.nbytes) for s in plan.specs), default=0)
    need = 0
    for bp in plan.buckets:
        staged = sum(aligned(spec.nbytes // tp) for i, spec in enumerate(bp.specs)
                     if _staged_kind(kinds.get((bp.index, i))))
        need = max(need, min(staged, largest))
    return need


def _staged_kind(kind) -> bool:
    return isinstance(kind, int) and not isinstance(kind, bool) and kind > 0


class BlockExchange:
    """One rank's part of the block transfers of a push (pipeline-parallel actors only; PP 1 moves nothing).

    Megatron rank order: global rank = tp_rank + TP x (dp_rank + DP x pp_rank)."""

    def __init__(self, rank: int, tp: int, dp: int, pp: int, tracker=None):
        self.rank, self.tp, self.dp, self.pp, self.tracker = rank, tp, dp, pp, tracker
        self.tp_rank = rank % tp
        self.pp_rank = rank // (tp * dp)
        self.received = 0
        self._tag = 0

    def _sender(self, stage: int) -> int:
        return self.tp_rank + self.tp * self.dp * stage

    def _receivers(self, stage: int) -> list:
        return [self.tp_rank + self.tp * (d + self.dp * p) for p in range(self.pp) if p != stage
                for d in range(self.dp)]

    def exchange(self, bucket, stage: int, kinds: list, staging: Optional[torch.Tensor]) -> None:
        """Move the bucket's block tensors (kinds[i] not None) from stage `stage` to the other stages."""
        import torch.distributed as dist

        if self.pp == 1:
            return
        me_send = self.rank == self._sender(stage)
        me_recv = self.pp_rank != stage
        direct, staged = [], []
        for i, kind in enumerate(kinds):
            if kind is None:
                continue
            self._tag += 1
            spec = bucket.plan.specs[i]
            block = _block_view(bucket.view(i), kind, spec, self.tp, self.tp_rank)
            (direct if block.is_contiguous() else staged).append((self._tag, block))
        works = []
        for tag, block in direct:
            if me_send:
                works += [dist.isend(block, dst, tag=tag) for dst in self._receivers(stage)]
            elif me_recv:
                works.append(dist.irecv(block, self._sender(stage), tag=tag))
                self.received += block.numel() * block.element_size()
        if staged and (me_send or me_recv):
            self._staged(staged, stage, staging, me_send)
        for w in works:
            w.wait()

    def _staged(self, staged: list, stage: int, staging: torch.Tensor, me_send: bool) -> None:
        """Blocks that are not contiguous in the bucket (row-parallel weights), through the staging buffer in
        waves: every message of a wave is posted at once (one cross-process wake-up per wave, not per tensor)."""
        import torch.distributed as dist

        waves, cur, used = [], [], 0
        for tag, block in staged:
            need = aligned(block.numel() * block.element_size())
            if cur and used + need > staging.numel():
                waves.append(cur)
                cur, used = [], 0
            cur.append((tag, block, used))
            used += need
        waves.append(cur)
        for wave in waves:
            held = [(tag, block, staging[off:off + block.numel() * block.element_size()].view(block.dtype)
                     .view(block.shape)) for tag, block, off in wave]
            if self.tracker is not None:  # the staging buffer in use: the tensor-in-hand allowance
                self.tracker.observe(sum(h.numel() * h.element_size() for _, _, h in held))
            if me_send:
                for _, block, h in held:
                    h.copy_(block)
                works = [dist.isend(h, dst, tag=tag) for tag, _, h in held for dst in self._receivers(stage)]
            else:
                works = [dist.irecv(h, self._sender(stage), tag=tag) for tag, _, h in held]
            for w in works:
                w.wait()
            if not me_send:
                for _, block, h in held:
                    block.copy_(h)
                    self.received += h.numel() * h.element_size()
