"""TP resharding for weight sync: each HF tensor of a bucket is assembled in the bucket, on the stage leader, from
the TP ranks' local shards.

Why not `export_hf_weights` (all_gather per parameter, then the mapping's cat/split): gloo's all_gather moves every
shard to every TP rank although only the leader packs buckets, copies its result out of an internal flat buffer,
and the mapping then cats the shards and splits/reshapes the HF tensors into fresh tensors before the bucket copy:
up to four copies and as many freshly faulted-in allocations per byte, one blocking collective per parameter. Here each
TP peer sends the leader exactly the bytes it lacks, point to point, all messages of a bucket posted at once, and
the leader receives them straight into the bucket wherever the HF layout makes that destination contiguous
(staging, then one copy, otherwise); the leader's own share is copied in once.

Where each rank's bytes go is derived from the mapping itself (`models/layout.py`); a parameter whose mapping is
not a pure slice permutation along the TP dim falls back to the all_gather path, still correct.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from spark_megatron.models.layout import (OutputLayout, Segment, derive_layout, hf_shapes,  # noqa: F401
                                          layout_fits)
from spark_megatron.sync.manifest import TensorSpec, aligned


# ------------------------------------------------------------------------------------------ per-stage jobs

@dataclass
class HFJob:
    """One HF tensor of the stage's stream: the parameter it comes from and how to assemble it."""

    spec: TensorSpec
    shard: torch.Tensor
    """This rank's local shard of the Megatron parameter (detached, no copy)."""
    mapping: object
    param: int
    """Index of the parameter in the stage (outputs of one parameter share it)."""
    out: int
    last: bool
    """Last HF output of its parameter."""
    layout: Optional[OutputLayout]
    """None: fallback (TP all_gather + the mapping on the full tensor)."""

    def seg_shape(self, seg: Segment) -> tuple:
        shape = list(self.spec.shape)
        shape[self.layout.dim] = seg.length
        return tuple(shape)

    def seg_nbytes(self, seg: Segment) -> int:
        n = self.spec.dtype.itemsize
        for d in self.seg_shape(seg):
            n *= d
        return n

    def staged(self, seg: Segment) -> bool:
        """The segment is not contiguous inside the (contiguous) HF tensor: it is received into staging."""
        dim = self.layout.dim
        outer = 1
        for d in self.spec.shape[:dim]:
            outer *= d
        return outer != 1 and seg.length != self.spec.shape[dim]

    def direct_source(self, seg: Segment) -> bool:
        """A peer sends this segment straight from its parameter: one run, contiguous, no dtype cast."""
        return (len(seg.src) == 1 and self.shard.dtype == self.spec.dtype
                and self.shard.narrow(self.layout.dim, *seg.src[0]).is_contiguous())

    def copy_runs(self, seg: Segment, target: torch.Tensor) -> None:
        """target (seg_shape) <- this rank's runs of the segment (casts to the export dtype)."""
        dim, off = self.layout.dim, 0
        for start, length in seg.src:
            target.narrow(dim, off, length).copy_(self.shard.narrow(dim, start, length))
            off += length


def stage_jobs(model, registry, tied: bool, dtype: Optional[torch.dtype], tp: int) -> list:
    """The HF tensors `export_hf_weights` streams for this stage, in its order, each with its layout."""
    from spark_megatron.models.weights import mapping_for, global_param_names

    jobs = []
    for index, (name, param) in enumerate(global_param_names(model)):
        if tied and name.endswith("output_layer.weight"):
            continue  # HF ties lm_head to the embedding; the first stage exports it
        mapping, layer = mapping_for(registry, name, tied)
        shard_shape = tuple(int(d) for d in param.shape)
        shapes = hf_shapes(mapping, shard_shape, tp)
        layout = derive_layout(mapping, shard_shape, tp)
        if not layout_fits(layout, shard_shape, shapes):
            layout = None
        _, hf_names = mapping.resolve(layer)
        shard = param.detach()
        for out, (hf_name, shape) in enumerate(zip(hf_names, shapes)):
            jobs.append(HFJob(TensorSpec(hf_name, shape, dtype or param.dtype), shard, mapping, index, out,
                              out == len(shapes) - 1, layout[out] if layout else None))
    return jobs


def _messages(jobs: list, skip=frozenset()) -> list:
    """(tag, job index, segment) of every peer -> leader message of a bucket, in the order both sides post them:
    directly received ones first, then staged ones. One order on both sides also suits NCCL, which matches
    point-to-point messages by order, not by tag. Jobs whose index is in `skip` are not assembled."""
    msgs, tag = [], 0
    for i, job in enumerate(jobs):
        if i in skip:
            continue
        for seg in (job.layout.segments if job.layout else ()):
            if seg.rank != 0:
                msgs.append((tag, i, seg))
                tag += 1
    return sorted(msgs, key=lambda m: (jobs[m[1]].staged(m[2]), m[0]))


class StageJobs(list):
    """A stage's HFJobs in stream order, with each bucket's message list computed once: the plan, and so the
    slices, repeat every push."""

    def __init__(self, jobs):
        super().__init__(jobs)
        self._msgs: dict = {}
        self.skip: frozenset = frozenset()
        """Indices of jobs the leader does not assemble (colocated pushes: tensors that travel as per-rank
        blocks, see sync/blocks.py)."""

    def set_skip(self, skip) -> None:
        skip = frozenset(skip)
        if skip != self.skip:
            self.skip = skip
            self._msgs.clear()

    def skipped(self, start: int, n: int) -> frozenset:
        """`skip` relative to a slice."""
        return frozenset(i - start for i in self.skip if start <= i < start + n)

    def messages(self, start: int, n: int) -> list:
        key = (start, n)
        if key not in self._msgs:
            self._msgs[key] = _messages(self[start:start + n], self.skipped(start, n))
        return self._msgs[key]

    def pack_bytes(self, start: int, n: int, rank: int) -> int:
        """Bytes TP rank `rank` packs for this slice (segments it cannot send straight from its shard)."""
        return sum(aligned(self[start + i].seg_nbytes(seg)) for _, i, seg in self.messages(start, n)
                   if seg.rank == rank and not self[start + i].direct_source(seg))

    def staging_bytes(self, start: int, n: int) -> int:
        """Leader's receive staging for this slice: as large as its largest HF tensor (the one-tensor-in-hand
        allowance of the memory bound), or 0 when no segment needs staging. Staged segments go in waves."""
        if not any(self[start + i].staged(seg) for _, i, seg in self.messages(start, n)):
            return 0
        return max(aligned(j.spec.nbytes) for j in self[start:start + n])


_JOBS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""model chunk -> (registry, key, StageJobs) of its last push."""


def cached_stage_jobs(model, registry, tied: bool, dtype: Optional[torch.dtype], tp: int) -> StageJobs:
    """`stage_jobs`, reused while the chunk's parameters keep their storage, shapes and dtypes (every push of a
    training run: the optimizer updates in place, which the jobs' detached views see). Rebuilding walks the
    module tree and the name/mapping tables, a few ms per push for nothing."""
    with torch._C.DisableTorchFunction():  # see StageResharder.run
        key = (tied, dtype, tp, tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in model.parameters()))
    hit = _JOBS.get(model)
    if hit is not None and hit[0] is registry and hit[1] == key:
        return hit[2]
    jobs = StageJobs(stage_jobs(model, registry, tied, dtype, tp))
    _JOBS[model] = (registry, key, jobs)
    return jobs


# ------------------------------------------------------------------------------------------ execution

class StageResharder:
    """One model chunk's part of a push on one TP rank: walks the stage's HF tensors bucket by bucket.

    Every TP rank of the producing stage calls `run` for each of the stage's buckets; the leader (TP rank 0)
    passes the bucket to fill, peers pass None and a pack buffer for the segments they cannot send in place.
    """

    def __init__(self, jobs: list, tracker=None, tag_base: int = 0):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        self.jobs, self.pos, self.tracker = jobs, 0, tracker
        self.group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.ranks = dist.get_process_group_ranks(self.group) if ps.get_tensor_model_parallel_world_size() > 1 \
            else [dist.get_rank()]
        self._fallback: Optional[tuple] = None
        """(parameter index, HF outputs) of the all-gathered fallback parameter in use."""
        self._tag_base = tag_base
        """Tags count over the whole push (both sides alike), so messages of different buckets (or model
        chunks, whose bases differ) never match."""
        self._in_flight: list = []
        """Peer: sends not waited for yet (it runs ahead of the leader, see _contribute)."""
        self._packed_in_flight: list = []
        self.received = 0
        """Bytes this rank received so far (leader: peers' segments; every rank: fallback all-gathers)."""

    def take(self, bp) -> int:
        """Start of the next bucket's jobs, checked against its plan (names, shapes, dtypes)."""
        from spark_megatron.sync.push import WeightSyncError

        start = self.pos
        self.pos += len(bp.specs)
        for k, spec in enumerate(bp.specs):
            if start + k >= len(self.jobs):
                raise WeightSyncError(f"stage ended before tensor '{spec.name}' of bucket {bp.index}")
            got = self.jobs[start + k].spec
            if got != spec:
                raise WeightSyncError(f"stage exports '{got.name}' {got.describe()} where the plan has "
                                      f"'{spec.name}' {spec.describe()}")
        return start

    def exhausted(self) -> bool:
        return self.pos == len(self.jobs)

    def run(self, bp, bucket=None, pack: Optional[torch.Tensor] = None, staging: Optional[torch.Tensor] = None):
        # Outside torch-function handling: on CPU, parallel/cpu_compat's TorchFunctionMode intercepts every
        # narrow/view/copy_ (several us each, a few hundred per bucket: 10-50% of a push). Nothing here needs
        # its CUDA->CPU rewriting (every tensor already lives on the compute device).
        with torch._C.DisableTorchFunction():
            self._run(bp, bucket, pack, staging)

    def _run(self, bp, bucket, pack, staging) -> None:
        start = self.take(bp)
        jobs, msgs = self.jobs[start:start + len(bp.specs)], self.jobs.messages(start, len(bp.specs))
        skip = self.jobs.skipped(start, len(bp.specs))
        if self.tp_rank == 0:
            self._assemble(bucket, jobs, msgs, staging, skip)
            self.received += sum(jobs[i].seg_nbytes(seg) for _, i, seg in msgs)
        else:
            self._contribute(jobs, msgs, pack)
        self._tag_base += len(msgs)
        for i, job in enumerate(jobs):
            if job.layout is None and i not in skip:
                self._run_fallback(job, bucket.view(i) if bucket is not None else None)

    def _assemble(self, bucket, jobs: list, msgs: list, staging: Optional[torch.Tensor], skip=frozenset()) -> None:
        """Leader: post the receives of the peers' segments, copy its own share meanwhile, then unstage."""
        import torch.distributed as dist

        direct, staged = [], []
        for tag, i, seg in msgs:
            target = bucket.view(i).narrow(jobs[i].layout.dim, seg.dst, seg.length)
            if jobs[i].staged(seg):
                staged.append((tag, seg.rank, jobs[i].seg_nbytes(seg), target))
            else:
                direct.append(dist.irecv(target, self.ranks[seg.rank], group=self.group,
                                         tag=self._tag_base + tag))
        waves = _waves(staged, staging.numel() if staging is not None else 0)
        pending = self._post_wave(waves[0], staging) if waves else []
        for i, job in enumerate(jobs):
            for seg in (job.layout.segments if job.layout and i not in skip else ()):
                if seg.rank == 0:
                    job.copy_runs(seg, bucket.view(i).narrow(job.layout.dim, seg.dst, seg.length))
        for k in range(len(waves)):
            for work, held, target in pending:
                work.wait()
                target.copy_(held)
            pending = self._post_wave(waves[k + 1], staging) if k + 1 < len(waves) else []
        for work in direct:
            work.wait()

    def _post_wave(self, wave: list, staging: torch.Tensor) -> list:
        import torch.distributed as dist

        out, off = [], 0
        for tag, rank, nbytes, target in wave:
            held = staging[off:off + nbytes].view(target.dtype).view(target.shape)
            work = dist.irecv(held, self.ranks[rank], group=self.group, tag=self._tag_base + tag)
            out.append((work, held, target))
            off += aligned(nbytes)
        if self.tracker is not None:
            self.tracker.observe(off)
        return out

    def _contribute(self, jobs: list, msgs: list, pack: Optional[torch.Tensor]) -> None:
        """Peer: send the leader this rank's segments, in place where possible, else packed; then move on
        without waiting. The leader receives a bucket only once the previous one left its buffer, so a peer
        that waited for every bucket would add a cross-process wake-up per bucket to the leader's critical
        path; running ahead, its messages are queued before the leader asks. Only the pack buffer bounds it:
        it is overwritten only after the sends reading it completed."""
        import torch.distributed as dist

        mine = [(tag, jobs[i], seg) for tag, i, seg in msgs if seg.rank == self.tp_rank]
        if any(not job.direct_source(seg) for _, job, seg in mine):
            self._wait(self._packed_in_flight)
        off = 0
        for tag, job, seg in mine:
            if job.direct_source(seg):
                t, queue = job.shard.narrow(job.layout.dim, *seg.src[0]), self._in_flight
            else:
                nbytes = job.seg_nbytes(seg)
                t, queue = pack[off:off + nbytes].view(job.spec.dtype).view(job.seg_shape(seg)), self._packed_in_flight
                job.copy_runs(seg, t)
                off += aligned(nbytes)
            queue.append(dist.isend(t, self.ranks[0], group=self.group, tag=self._tag_base + tag))

    @staticmethod
    def _wait(works: list) -> None:
        for work in works:
            work.wait()
        works.clear()

    def drain(self, packed_only: bool = False) -> None:
        """Wait for the sends still in flight: all of them at the end of the push; the packed ones before
        the pack buffer is written by something else (the broadcast of a peer that packs in its bucket)."""
        with torch._C.DisableTorchFunction():
            self._wait(self._packed_in_flight)
            if not packed_only:
                self._wait(self._in_flight)

    def _run_fallback(self, job: HFJob, target: Optional[torch.Tensor]) -> None:
        """All-gather the whole parameter (every TP rank) and apply the mapping, as `export_hf_weights` does."""
        from spark_megatron.models.weights import gather_tp

        if self._fallback is None or self._fallback[0] != job.param:
            full = gather_tp(job.shard, job.mapping)
            if full is not job.shard:
                self.received += (full.numel() - job.shard.numel()) * full.element_size()
            if self.tracker is not None:
                self.tracker.observe(full.numel() * full.element_size())
            self._fallback = (job.param, job.mapping.full_to_hf(full))
        if target is not None:
            target.copy_(self._fallback[1][job.out])
        if job.last:
            self._fallback = None


def _waves(staged: list, capacity: int) -> list:
    """Group staged receives, in order, into waves that fit the staging buffer together."""
    waves, cur, used = [], [], 0
    for item in staged:
        need = aligned(item[2])
        if cur and used + need > capacity:
            waves.append(cur)
            cur, used = [], 0
        cur.append(item)
        used += need
    return waves + ([cur] if cur else [])
