"""Flat byte buckets: one reusable buffer per push, tensors packed at planned offsets, zero-copy views out.

Memory bound of a push: the bucket buffer (the largest planned bucket, at most `bucket_bytes` unless a single
reload unit is larger) plus whatever tensor the producer has in hand while it is copied in. `LiveBytes` measures
exactly that, so tests and the benchmark can assert it instead of trusting it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from spark_megatron.sync.manifest import BucketPlan, SyncPlan, TensorSpec


class LiveBytes:
    """Live bytes of the buffers the sync path allocated, plus transient producer tensors; keeps the peak."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.largest_transient = 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._release, n)
        return t

    def _release(self, n: int) -> None:
        self.live -= n

    def observe(self, transient_bytes: int) -> None:
        """Account a tensor held outside the buffers right now (e.g. the one being copied in)."""
        self.largest_transient = max(self.largest_transient, transient_bytes)
        self.peak = max(self.peak, self.live + transient_bytes)

    def reset_peak(self) -> None:
        self.peak = self.live
        self.largest_transient = 0


@dataclass
class Bucket:
    """A filled (or being filled) bucket: the plan entry and a flat uint8 view holding its bytes."""

    plan: BucketPlan
    flat: torch.Tensor

    @property
    def specs(self) -> tuple:
        return self.plan.specs

    def view(self, i: int) -> torch.Tensor:
        spec: TensorSpec = self.plan.specs[i]
        off = self.plan.offsets[i]
        return self.flat[off:off + spec.nbytes].view(spec.dtype).view(spec.shape)

    def named_tensors(self) -> list:
        """(hf_name, tensor view) pairs; valid only until the buffer is reused for the next bucket."""
        return [(s.name, self.view(i)) for i, s in enumerate(self.plan.specs)]

    def fill(self, i: int, t: torch.Tensor) -> None:
        self.view(i).copy_(t)


class BucketBuffer:
    """The one reusable byte buffer of a push, sized for the largest bucket of the plan."""

    def __init__(self, plan: SyncPlan, device=None, tracker: Optional[LiveBytes] = None):
        self.capacity = plan.max_bucket_nbytes
        buf = torch.empty(self.capacity, dtype=torch.uint8, device=device)
        self.buffer = tracker.track(buf) if tracker is not None else buf

    def bucket(self, plan: BucketPlan) -> Bucket:
        return Bucket(plan, self.buffer[:plan.nbytes])

    def release(self) -> None:
        self.buffer = None
