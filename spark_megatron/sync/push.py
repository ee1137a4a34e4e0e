"""Push weights into rollout engines bucket by bucket: from any named-tensor source, or from Megatron actors.

Flow of one push: plan (metadata only) -> every sink validates the whole plan -> for each bucket: the producing
stage fills the one reusable buffer, the bucket travels to the sink holders, the sinks load it -> commit (the
engines record the new policy version). A rejected plan raises on every rank and nothing is written anywhere.

Delivery for Megatron actors (`push_actor_weights`):
- "to_rank0": each pipeline stage's leader (TP rank 0, DP rank 0) sends its buckets point-to-point to global
  rank 0, which holds the sink (an in-process engine, or a `ChannelSink` to engine processes). No rank ever
  gathers the full model; stages stream one bucket at a time.
- "broadcast": each bucket is broadcast from its stage leader to every rank, and every rank that passes a sink
  loads it.
- "colocated": every rank holds its part of an engine (vLLM external_launcher); tensors the ranks already hold
  as the engine's blocks stay where they are or travel as blocks (`sync.blocks`), the rest is broadcast.
TP shards are assembled into full HF tensors on each stage's leader (`sync.reshard`), so the engine's TP size is
independent of the actor's.

Engines take part through `WeightLoader`, declared here: the rollout engines implement it without importing this
package, and whoever holds an engine (the roles, a test, the engine process of `sync.remote`) wraps it in an
`EngineSink`.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Protocol, Sequence

import torch

from spark_megatron.sync.bucket import Bucket, BucketBuffer, LiveBytes
from spark_megatron.sync.manifest import SyncPlan, TensorSpec, grouped_by_module, plan_buckets
from spark_megatron.sync.validation import ExpectedWeights


class WeightSyncError(RuntimeError):
    """A push that failed after validation (transport or engine load failure); engines are marked stale."""


class WeightSink(Protocol):
    """Receives one push: validate the plan, load buckets in order, then commit (or abort)."""

    def begin(self, plan: SyncPlan, version: int) -> None: ...

    def push(self, bucket: Bucket) -> None: ...

    def commit(self, version: int) -> None: ...

    def abort(self, reason: str) -> None: ...


class WeightLoader(Protocol):
    """What a push needs from an in-process engine (the rollout engines implement it)."""

    hf_dir: str
    """The engine's HF checkpoint: its tensor names and shapes are what a push must match."""
    dtype: torch.dtype
    """The engine's compute dtype: every pushed tensor must have it."""

    def packed_modules(self) -> Optional[Mapping]:
        """The engine's module fusion table (vLLM `packed_modules_mapping`), None for the default."""

    def begin_update(self, version: int) -> None:
        """A validated push starts (wake the weights if asleep)."""

    def load_bucket(self, named_tensors: list) -> None:
        """Load [(hf_name, tensor)] whole engine modules."""

    def finish_update(self, version: int) -> None:
        """Every bucket arrived: serve `version` from now on."""

    def abort_update(self, reason: str, dirty: bool) -> None:
        """The push was cancelled; `dirty`: some bucket was already written (the engine must refuse to serve)."""


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def expected_weights(engine: WeightLoader) -> ExpectedWeights:
    """The table a push into `engine` is validated against, from its own checkpoint (built once per engine)."""
    table = _TABLES.get(engine)
    if table is None:
        table = _TABLES[engine] = ExpectedWeights.from_hf_dir(engine.hf_dir, engine.dtype, engine.packed_modules())
    return table


class EngineSink:
    """Validates a plan against an engine's weight table, then loads buckets into it."""

    def __init__(self, engine: WeightLoader, require_all: bool = True, expected: Optional[ExpectedWeights] = None):
        """`expected`: the table to validate against (default: the engine's checkpoint, `expected_weights`)."""
        self.engine = engine
        self.require_all = require_all
        self.expected = expected
        self._plan: Optional[SyncPlan] = None
        self._next = 0

    def begin(self, plan: SyncPlan, version: int) -> None:
        (self.expected or expected_weights(self.engine)).check_plan(plan, self.require_all)
        self._plan, self._next = plan, 0
        self.engine.begin_update(version)

    def push(self, bucket: Bucket) -> None:
        if self._plan is None or bucket.plan != self._plan.buckets[self._next]:
            raise WeightSyncError(f"bucket {bucket.plan.index} arrived out of plan order (expected {self._next})")
        try:
            self.engine.load_bucket(bucket.named_tensors())
        except Exception as e:  # noqa: BLE001 - any engine failure leaves it partially updated
            reason = f"engine failed to load bucket {bucket.plan.index} ({type(e).__name__}: {e})"
            self.abort(reason)
            raise WeightSyncError(reason) from e
        self._next += 1

    def commit(self, version: int) -> None:
        if self._plan is None or self._next != len(self._plan.buckets):
            self.abort("push ended before all planned buckets arrived")
            raise WeightSyncError(f"commit after {self._next} of "
                                  f"{len(self._plan.buckets) if self._plan else 0} buckets")
        self.engine.finish_update(version)
        self._plan = None

    def abort(self, reason: str) -> None:
        """Cancel the push; the engine is marked stale only if some bucket was already written."""
        self.engine.abort_update(reason, dirty=self._next > 0)
        self._plan = None


class NullSink:
    """Accepts and drops buckets (measures the produce side alone)."""

    def begin(self, plan, version):
        pass

    def push(self, bucket):
        pass

    def commit(self, version):
        pass

    def abort(self, reason):
        pass


@dataclass
class PushStats:
    version: int
    buckets: int
    bytes: int
    """Bytes of HF tensors in the update."""
    seconds: float
    produce_s: float = 0.0
    """Time spent pulling tensors from the source/exporter (incl. TP gathers) and copying them into buckets."""
    deliver_s: float = 0.0
    """Time in point-to-point / broadcast transfers between ranks."""
    sink_s: float = 0.0
    """Time in sink.push (engine load, or the channel to engine processes)."""
    peak_tracked_bytes: int = 0
    bucket_capacity: int = 0
    received_bytes: int = 0
    """Bytes this rank received from other ranks (actor pushes: TP assembly, broadcasts, blocks)."""


def begin_all(sinks: Sequence[WeightSink], plan: SyncPlan, version: int) -> None:
    """Begin on every sink, or on none: a rejection by one cancels those already begun (nothing written)."""
    begun = []
    try:
        for s in sinks:
            s.begin(plan, version)
            begun.append(s)
    except BaseException:
        for s in begun:
            s.abort("another engine rejected the update")
        raise


# ------------------------------------------------------------------------------------------ named-tensor sources

class WeightSource(Protocol):
    """A stream of (hf_name, tensor) whose specs are known before it is read."""

    def specs(self) -> list: ...

    def __iter__(self) -> Iterator[tuple]: ...


class PairsSource:
    """In-memory (name, tensor) pairs (a list or a state dict)."""

    def __init__(self, pairs):
        pairs = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
        order = {n: i for i, n in enumerate(grouped_by_module([n for n, _ in pairs]))}
        self.pairs = sorted(pairs, key=lambda p: order.get(p[0], len(order)))

    def specs(self) -> list:
        return [TensorSpec.of(n, t) for n, t in self.pairs]

    def __iter__(self):
        return iter(self.pairs)


class CheckpointSource:
    """An HF safetensors checkpoint read lazily, one tensor at a time (optionally cast)."""

    _DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}

    def __init__(self, hf_dir, dtype: Optional[torch.dtype] = None):
        from spark_megatron.models.weights import HFCheckpointReader

        self.reader = HFCheckpointReader(hf_dir)
        self.dtype = dtype
        self.names = grouped_by_module(self.reader.keys())

    def specs(self) -> list:
        from safetensors import safe_open

        out = []
        for name in self.names:
            path = self.reader.dir / self.reader._where[name]
            with safe_open(str(path), framework="pt") as h:
                sl = h.get_slice(name)
                dt = self.dtype or self._DTYPES[sl.get_dtype()]
                out.append(TensorSpec(name, tuple(int(d) for d in sl.get_shape()), dt))
        return out

    def __iter__(self):
        for name in self.names:
            t = self.reader.get(name)
            yield name, (t.to(self.dtype) if self.dtype is not None else t)


def as_source(weights) -> WeightSource:
    """WeightSource passthrough; lists, tuples and dicts of tensors wrap; other iterables are materialised
    (so they can be validated as a whole before anything is written)."""
    if hasattr(weights, "specs") and hasattr(weights, "__iter__"):
        return weights
    return PairsSource(weights if isinstance(weights, Mapping) else list(weights))


def _fill(bucket: Bucket, stream: Iterator, tracker: Optional[LiveBytes]) -> None:
    for i, spec in enumerate(bucket.specs):
        try:
            name, t = next(stream)
        except StopIteration:
            raise WeightSyncError(f"source ended before tensor '{spec.name}' of bucket {bucket.plan.index}") from None
        got = TensorSpec.of(name, t)
        if got != spec:
            raise WeightSyncError(f"source yielded '{name}' {got.describe()} where the plan has '{spec.name}' "
                                  f"{spec.describe()}")
        if tracker is not None:
            tracker.observe(t.numel() * t.element_size())
        bucket.fill(i, t)
        del t


def push_source(sinks: Sequence[WeightSink], weights, version: int, bucket_bytes: int,
                tracker: Optional[LiveBytes] = None, device=None) -> PushStats:
    """Push any named-tensor source into sinks (single process): validate all, then bucket by bucket."""
    source = as_source(weights)
    t0 = time.perf_counter()
    plan = plan_buckets([source.specs()], bucket_bytes)
    begin_all(sinks, plan, version)
    stats = PushStats(version, len(plan.buckets), plan.total_bytes, 0.0)
    buf = BucketBuffer(plan, device, tracker)
    stream = iter(source)
    try:
        for bp in plan.buckets:
            bucket = buf.bucket(bp)
            t1 = time.perf_counter()
            _fill(bucket, stream, tracker)
            t2 = time.perf_counter()
            for s in sinks:
                s.push(bucket)
            stats.produce_s += t2 - t1
            stats.sink_s += time.perf_counter() - t2
    except BaseException as e:
        for s in sinks:
            s.abort(f"push of version {version} failed: {e}")
        raise
    finally:
        stats.bucket_capacity = buf.capacity
        buf.release()  # back to the pool for the next push
    for s in sinks:
        s.commit(version)
    stats.seconds = time.perf_counter() - t0
    stats.peak_tracked_bytes = tracker.peak if tracker is not None else 0
    return stats


def push_into(engine: WeightLoader, weights, version: int, bucket_bytes: Optional[int] = None) -> PushStats:
    """Validate a full set of named tensors against one in-process engine, then load it bucket by bucket."""
    return push_source([EngineSink(engine)], weights, version, bucket_bytes or getattr(engine, "bucket_bytes",
                                                                                        512 << 20))
