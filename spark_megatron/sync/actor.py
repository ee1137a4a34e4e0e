"""Push a Megatron actor's weights (its TP/PP shards) into rollout engines; every rank of the job calls.

Per push: plan (metadata; reused when no rank's stage changed) -> the sinks validate the whole plan, all ranks
agree -> for each bucket: the producing stage's TP ranks assemble it on their leader (`sync.reshard`), it
travels to the sink holders ("to_rank0" or "broadcast", see `sync.push`), the sinks load it -> commit.
"colocated": every rank holds a sink (its part of an engine); where actor TP == engine TP, TP-split tensors
travel as per-rank blocks instead (`sync.blocks`), the rest is assembled and broadcast.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from spark_megatron.parallel.cpu_compat import compute_device
from spark_megatron.sync.blocks import BlockExchange, block_kind, fill_own_block, staging_need
from spark_megatron.sync.bucket import BucketBuffer, LiveBytes, PooledBuffer
from spark_megatron.sync.manifest import SyncPlan, plan_buckets, stage_specs
from spark_megatron.sync.push import PushStats, WeightSink, WeightSyncError
from spark_megatron.sync.reshard import StageResharder, cached_stage_jobs
from spark_megatron.sync.validation import WeightValidationError


@dataclass(frozen=True)
class _Producer:
    leader: int
    """Global rank that packs and sends this stream's buckets (TP rank 0, DP rank 0 of the stage)."""
    pp_rank: int
    chunk: int


_PLAN_CACHE: dict = {}
"""The last actor plan and the per-rank fingerprints it was built from."""


def _fingerprint(obj) -> int:
    return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little", signed=True)


def actor_plan(model_chunks: Sequence, registry, bucket_bytes: int, tied: bool = False,
               dtype: Optional[torch.dtype] = None, local: Optional[list] = None) -> SyncPlan:
    """The global plan of an actor push (all ranks call; metadata only).

    Every rank's (ranks, stage specs) fingerprint goes through one 8-byte all_gather; when all of them equal the
    previous call's, that plan is reused: a training run pushes the same layout every step, and the full
    exchange (all_gather_object of every stage's specs) costs more than the rest of a small push's metadata.
    """
    if local is None:
        local = [stage_specs(c, registry, tied, dtype) for c in model_chunks]
    return _plan_with_kinds(local, None, bucket_bytes)[0]


def _plan_with_kinds(local: list, kinds: Optional[list], bucket_bytes: int) -> tuple:
    """(plan, {(bucket index, position): block kind}) from every stage's specs and, per spec, its block kind
    (sync.blocks; None everywhere unless a colocated push with equal TPs)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    me = (dist.get_rank(), ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
          ps.get_data_parallel_rank(with_context_parallel=True), local, kinds)
    mine = torch.tensor([_fingerprint((me, bucket_bytes))], dtype=torch.int64, device=compute_device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    key = tuple(int(t.item()) for t in every)
    if _PLAN_CACHE.get("key") == key:
        return _PLAN_CACHE["plan"], _PLAN_CACHE["kinds"]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    leaders = sorted((e for e in everyone if e[1] == 0 and e[3] == 0), key=lambda e: e[2])
    streams, sources, stream_kinds = [], [], []
    for rank, _tp, pp, _dp, chunks, chunk_kinds in leaders:
        for c, specs in enumerate(chunks):
            streams.append(specs)
            sources.append(_Producer(rank, pp, c))
            stream_kinds.append(chunk_kinds[c] if chunk_kinds else [None] * len(specs))
    plan = plan_buckets(streams, bucket_bytes, sources)
    pos, by_bucket = [0] * len(streams), {}
    for bp in plan.buckets:
        for i in range(len(bp.specs)):
            kind = stream_kinds[bp.source][pos[bp.source] + i]
            if kind is not None:
                by_bucket[(bp.index, i)] = kind
        pos[bp.source] += len(bp.specs)
    _PLAN_CACHE.update(key=key, plan=plan, kinds=by_bucket)
    return plan, by_bucket


def _agree(error: Optional[str]) -> Optional[str]:
    """All ranks learn the first error any rank saw (keeps every rank's control flow identical). One 1-element
    all_reduce when nobody failed; the messages travel only when someone did."""
    import torch.distributed as dist

    flag = torch.tensor([1 if error else 0], dtype=torch.int64, device=compute_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return None
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, error)
    return next((e for e in errs if e), None)


class _ActorPush:
    """One rank's part of an actor push (see push_actor_weights)."""

    def __init__(self, jobs: list, plan: SyncPlan, sink, delivery: str, tracker: Optional[LiveBytes],
                 kinds: Optional[dict] = None):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        self.rank, self.plan, self.sink, self.delivery = dist.get_rank(), plan, sink, delivery
        self.jobs, self.kinds = jobs, kinds or {}
        self.pp = ps.get_pipeline_model_parallel_rank()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        exporting = ps.get_data_parallel_rank(with_context_parallel=True) == 0  # one replica exports
        self.stages = {c: StageResharder(j, tracker, tag_base=c << 24) for c, j in enumerate(jobs)} \
            if exporting else {}
        needs_buffer = sink is not None or delivery != "to_rank0" or any(
            p.leader == self.rank for p in plan.sources)
        self.buf = BucketBuffer(plan, compute_device(), tracker) if needs_buffer else None
        self.starts = self._job_starts()
        block_need = staging_need(plan, self.kinds, ps.get_tensor_model_parallel_world_size()) \
            if ps.get_pipeline_model_parallel_world_size() > 1 else 0
        self.staging, self.pack = self._side_buffers(jobs, self.tp_rank, tracker, block_need)
        self.blocks = BlockExchange(self.rank, ps.get_tensor_model_parallel_world_size(),
                                    ps.get_data_parallel_world_size(with_context_parallel=True),
                                    ps.get_pipeline_model_parallel_world_size(), tracker) if self.kinds else None
        capacity = self.buf.capacity if self.buf else (self.pack.capacity if self.pack else 0)
        self.stats = PushStats(0, len(plan.buckets), plan.total_bytes, 0.0, bucket_capacity=capacity)
        self.failure: Optional[str] = None
        self.received = 0
        """Bytes delivered to this rank by broadcasts (assembly and block receives are counted where they
        happen)."""

    def _job_starts(self) -> dict:
        """bucket index -> position of its first tensor in the producing chunk's job list (own stage only)."""
        pos, out = {}, {}
        for bp in self.plan.buckets:
            prod: _Producer = self.plan.sources[bp.source]
            if prod.pp_rank == self.pp:
                out[bp.index] = pos.get(prod.chunk, 0)
                pos[prod.chunk] = out[bp.index] + len(bp.specs)
        return out

    def _my_slices(self, jobs: list) -> list:
        """(jobs, start, n) of the buckets this rank helps produce (its stage's buckets, in order)."""
        pos, out = {c: 0 for c in self.stages}, []
        for bp in self.plan.buckets:
            prod: _Producer = self.plan.sources[bp.source]
            if prod.pp_rank == self.pp and prod.chunk in self.stages:
                out.append((jobs[prod.chunk], pos[prod.chunk], len(bp.specs)))
                pos[prod.chunk] += len(bp.specs)
        return out

    def _side_buffers(self, jobs: list, tp_rank: int, tracker, block_need: int = 0) -> tuple:
        """Leader: receive staging (one HF tensor, accounted as the tensor in hand when used). Peer: the pack
        buffer for segments it cannot send in place; its bucket buffer when it has one (broadcast delivery:
        idle until the bucket arrives), else its own, at most one bucket (tracked like a bucket buffer).
        Colocated pipeline pushes: the same staging also carries blocks that are not contiguous in the bucket
        (`block_need`, at most the largest tensor; used after the reshard of the bucket finished)."""
        slices = self._my_slices(jobs)
        staging = None
        if tp_rank == 0:
            need = max([js.staging_bytes(start, n) for js, start, n in slices] + [block_need])
            return (PooledBuffer("staging", need, compute_device()) if need else None), None
        if block_need:
            staging = PooledBuffer("staging", block_need, compute_device())
        need = max((js.pack_bytes(start, n, tp_rank) for js, start, n in slices), default=0)
        if not need or self.buf is not None:
            return staging, None
        return staging, PooledBuffer("pack", need, compute_device(), tracker)

    def _produce(self, bucket, bp, prod: _Producer) -> None:
        pack = self.pack.buffer if self.pack else (self.buf.buffer if self.buf is not None else None)
        stage = self.stages[prod.chunk]
        stage.run(bp, bucket if self.rank == prod.leader else None, pack=pack,
                  staging=self.staging.buffer if self.staging else None)
        if self.pack is None and self.rank != prod.leader:
            stage.drain(packed_only=True)  # packed into the bucket buffer, which the delivery overwrites

    def _fill_blocks(self, bucket, bp, prod: _Producer) -> list:
        """Colocated: this rank's own blocks of the bucket's block tensors (own stage) -> kinds per position."""
        kinds = [self.kinds.get((bp.index, i)) for i in range(len(bp.specs))]
        if prod.pp_rank == self.pp:
            start, jobs = self.starts[bp.index], self.jobs[prod.chunk]
            with torch._C.DisableTorchFunction():  # as in StageResharder.run
                for i, kind in enumerate(kinds):
                    if kind is not None:
                        fill_own_block(jobs[start + i], bucket.view(i), kind, self.tp_rank)
        return kinds

    def _broadcast_runs(self, bucket, kinds: list, src: int) -> None:
        """Broadcast the byte runs of the bucket's assembled (non-block) tensors from the stage leader."""
        import torch.distributed as dist

        bp, runs = bucket.plan, []
        for i, kind in enumerate(kinds):
            if kind is not None:
                continue
            lo, hi = bp.offsets[i], bp.offsets[i] + bp.specs[i].nbytes
            if runs and runs[-1][2] == i - 1:
                runs[-1] = (runs[-1][0], hi, i)
            else:
                runs.append((lo, hi, i))
        for lo, hi, _ in runs:
            dist.broadcast(bucket.flat[lo:hi], src=src)
            if self.rank != src:
                self.received += hi - lo

    def _deliver(self, bucket, prod: _Producer) -> None:
        import torch.distributed as dist

        if self.delivery == "colocated":
            kinds = self._fill_blocks(bucket, bucket.plan, prod)
            self._broadcast_runs(bucket, kinds, prod.leader)
            if self.blocks is not None:
                self.blocks.exchange(bucket, prod.pp_rank, kinds, self.staging.buffer if self.staging else None)
        elif self.delivery == "broadcast":
            dist.broadcast(bucket.flat, src=prod.leader)
        elif prod.leader != 0 and self.rank == prod.leader:
            dist.send(bucket.flat, dst=0)
        elif prod.leader != 0 and self.rank == 0:
            dist.recv(bucket.flat, src=prod.leader)

    def run_bucket(self, bp) -> None:
        prod: _Producer = self.plan.sources[bp.source]
        bucket = self.buf.bucket(bp) if self.buf is not None else None
        t0 = time.perf_counter()
        if prod.pp_rank == self.pp and prod.chunk in self.stages:
            self._produce(bucket, bp, prod)
        t1 = time.perf_counter()
        self._deliver(bucket, prod)
        t2 = time.perf_counter()
        if self.sink is not None and self.failure is None:
            try:
                self.sink.push(bucket)
            except Exception as e:  # noqa: BLE001 - keep draining so every rank's transfers stay matched
                self.failure = f"{type(e).__name__}: {e}"
        self.stats.produce_s += t1 - t0
        self.stats.deliver_s += t2 - t1
        self.stats.sink_s += time.perf_counter() - t2

    def check_exhausted(self) -> None:
        for c, stage in self.stages.items():
            stage.drain()
            if not stage.exhausted():
                raise WeightSyncError(f"model chunk {c} exported more tensors than planned")

    def release(self) -> None:
        for b in (self.buf, self.staging, self.pack):
            if b is not None:
                b.release()
        self.buf = self.staging = self.pack = None


def _begin(sink: Optional[WeightSink], plan: SyncPlan, version: int) -> None:
    """Every sink validates the whole plan; all ranks raise together if any rejected (nothing written)."""
    error = None
    if sink is not None:
        try:
            sink.begin(plan, version)
        except WeightValidationError as e:
            error = str(e)
    agreed = _agree(error)
    if agreed:
        if sink is not None and error is None:
            sink.abort("another rank's engine rejected the update")  # began here; nothing written yet
        raise WeightValidationError(agreed)


def _finish(job: _ActorPush, sink: Optional[WeightSink], version: int) -> None:
    if sink is not None:
        try:
            if job.failure:
                sink.abort(job.failure)
            else:
                sink.commit(version)
        except Exception as e:  # noqa: BLE001
            job.failure = job.failure or f"{type(e).__name__}: {e}"
    failure = _agree(job.failure)
    if failure:
        raise WeightSyncError(f"weight push of version {version} failed: {failure}")


def push_actor_weights(model_chunks: Sequence, registry, version: int, bucket_bytes: int,
                       sink: Optional[WeightSink] = None, tied: bool = False, dtype: Optional[torch.dtype] = None,
                       delivery: str = "to_rank0", tracker: Optional[LiveBytes] = None, engine_tp: int = 1,
                       engine_reads: Optional[Callable] = None) -> PushStats:
    """Stream the actor's weights (this rank's model chunks) into the sink(s); every rank must call.

    `sink`: with delivery "to_rank0" only global rank 0 passes one; with "broadcast" each rank that holds an
    engine passes its own; with "colocated" every rank passes its part of an engine of TP `engine_tp` (engine
    e = ranks [e x engine_tp, ...)), and `engine_reads(hf_name)` says what of a tensor its loader reads
    (`VLLMEngine.shard_reads`; None: whole tensors). `dtype`: export dtype (the engine's). Raises
    WeightValidationError on every rank when any sink rejects the plan (nothing written), WeightSyncError when
    loading failed midway. `PushStats.received_bytes`: what this rank received.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if delivery not in ("to_rank0", "broadcast", "colocated"):
        raise ValueError(f"delivery must be 'to_rank0', 'broadcast' or 'colocated', got '{delivery}'")
    if delivery == "to_rank0" and sink is not None and dist.get_rank() != 0:
        raise ValueError("delivery 'to_rank0': only global rank 0 may hold the sink")
    t0 = time.perf_counter()
    tp = ps.get_tensor_model_parallel_world_size()
    jobs = [cached_stage_jobs(c, registry, tied, dtype, tp) for c in model_chunks]
    kinds = None
    if delivery == "colocated":
        kinds = [[block_kind(j, tp, engine_tp, engine_reads) for j in js] for js in jobs]
        for js, ks in zip(jobs, kinds):
            js.set_skip(i for i, k in enumerate(ks) if k is not None)
    else:
        for js in jobs:
            js.set_skip(())
    plan, by_bucket = _plan_with_kinds([[j.spec for j in js] for js in jobs], kinds, bucket_bytes)
    _begin(sink, plan, version)
    job = _ActorPush(jobs, plan, sink, delivery, tracker, by_bucket)
    try:
        for bp in plan.buckets:
            job.run_bucket(bp)
        job.check_exhausted()
    finally:
        job.release()
    _finish(job, sink, version)
    job.stats.version = version
    job.stats.seconds = time.perf_counter() - t0
    job.stats.peak_tracked_bytes = tracker.peak if tracker is not None else 0
    job.stats.received_bytes = job.received + sum(st.received for st in job.stages.values()) + \
        (job.blocks.received if job.blocks is not None else 0)
    return job.stats
