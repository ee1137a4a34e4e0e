"""Megatron DDP buffer layout and DistributedOptimizer sharding, recomputed in plain integers.

Megatron's DistributedDataParallel groups a rank's trainable parameters by (param dtype, grad dtype) into
contiguous buffers, walking the parameters in reverse registration order (roughly backprop order). With the
distributed optimizer every parameter starts at a multiple of 64 elements, every bucket ends at a multiple of
lcm(DP, 128) and a `shared_embedding` parameter gets a bucket of its own; each DP rank then owns the
contiguous 1/DP slice of every bucket and keeps optimizer state only for the parameter elements inside its
slice (padding owns no state). Reproducing that here makes the planner's byte counts equal the real buffers
(checked against megatron-core on CPU in tests/distributed/test_planner_counts.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_BUCKET_ELEMENTS = 40_000_000
"""Megatron's bucket size when DistributedDataParallelConfig.bucket_size is None: max(40M, 1M x DP)."""


@dataclass
class BufferLayout:
    """One (param dtype, grad dtype) buffer of one rank."""

    numel: int
    """Elements including alignment/bucket padding (what param_data / grad_data allocate)."""
    numel_unpadded: int
    buckets: list = field(default_factory=list)
    """(start, end) element ranges of each bucket, padded."""
    param_ranges: list = field(default_factory=list)
    """(start, end) of each parameter in the buffer, in the input (registration) order."""


def _ceil_to(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def bucket_elements(dp: int, overlap_grad_reduce: bool, pp_rank: int,
                    bucket_size: Optional[int] = None) -> Optional[int]:
    """The bucket size DDP ends up using (None = one bucket), following DistributedDataParallel.__init__."""
    if not overlap_grad_reduce or pp_rank > 0:
        return None
    return bucket_size if bucket_size is not None else max(DEFAULT_BUCKET_ELEMENTS, 1_000_000 * dp)


def buffer_layout(numels: list, shared: list, dp: int, distributed_optimizer: bool,
                  bucket_size: Optional[int]) -> BufferLayout:
    """Lay out parameters (registration order) as megatron's _ParamAndGradBuffer does."""
    end_unit = math.lcm(dp, 128)

    def pad_bucket_end(i: int) -> int:
        return _ceil_to(i, end_unit) if distributed_optimizer else i

    def pad_param_start(i: int) -> int:
        return _ceil_to(i, 64) if distributed_optimizer else i

    ranges = [None] * len(numels)
    buckets, unpadded = [], 0
    bucket_start = param_start = 0
    in_bucket = 0
    param_end = 0

    def close_bucket(end_index: int) -> int:
        nonlocal bucket_start, in_bucket, unpadded
        unpadded += end_index - bucket_start
        padded_end = pad_bucket_end(end_index)
        buckets.append((bucket_start, padded_end))
        bucket_start, in_bucket = padded_end, 0
        return padded_end

    for idx in reversed(range(len(numels))):
        own_bucket = shared[idx] and distributed_optimizer
        param_start = pad_param_start(param_start)
        if own_bucket and in_bucket:
            param_start = close_bucket(param_start)
        param_end = param_start + numels[idx]
        ranges[idx] = (param_start, param_end)
        in_bucket += 1
        full = bucket_size is not None and param_end - bucket_start >= bucket_size
        param_start = close_bucket(param_end) if (full or own_bucket) else param_end
    if in_bucket:
        close_bucket(param_end)
    numel = buckets[-1][1] if buckets else 0
    return BufferLayout(numel=numel, numel_unpadded=unpadded, buckets=buckets, param_ranges=ranges)


def owned_elements(layout: BufferLayout, dp: int, dp_rank: int) -> list:
    """Per parameter: how many of its elements this DP rank's optimizer shard holds."""
    owned = [0] * len(layout.param_ranges)
    for start, end in layout.buckets:
        shard = (end - start) // dp
        lo, hi = start + dp_rank * shard, start + (dp_rank + 1) * shard
        for i, (ps, pe) in enumerate(layout.param_ranges):
            owned[i] += max(0, min(pe, hi) - max(ps, lo))
    return owned
