"""Flat byte buckets: one reusable buffer per push, tensors packed at planned offsets, zero-copy views out.

Memory bound of a push: the bucket buffer (the largest planned bucket, at most `bucket_bytes` unless a single
reload unit is larger) plus whatever tensor the producer has in hand while it is copied in. `LiveBytes` measures
exactly that, so tests and the benchmark can assert it instead of trusting it.

The buffers outlive a push (`POOL`): a fresh multi-MiB allocation is page-faulted in on first touch, which on CPU
costs several times the copy itself (and large ones go back to the OS on free, so every push paid it again).
Pushes of one training run plan the same buckets, so the next push reuses the same pages. `release_buffers()`
gives them back (e.g. before a memory-hungry phase); `POOL.held_bytes()` says what is kept between pushes.
"""
from __future__ import annotations

import threading
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


class BufferPool:
    """Byte buffers kept between pushes, one per (role, device); a buffer is reused only at the same size (a
    plan of another size replaces it, so what is held never exceeds what the current plan needs)."""

    def __init__(self):
        self._free: dict = {}
        self._lock = threading.Lock()

    def lease(self, role: str, nbytes: int, device=None) -> tuple:
        """-> (key, buffer); give the key back with `give_back` (a buffer in use is never handed out twice:
        a concurrent lease of the same role gets a fresh buffer that is pooled when given back)."""
        key = (role, str(torch.device(device)) if device is not None else "cpu")
        if not key[1].startswith("cpu"):  # device allocators cache already; pooling would only pin memory
            return None, torch.empty(nbytes, dtype=torch.uint8, device=device)
        with self._lock:
            buf = self._free.pop(key, None)
        if buf is not None and buf.numel() == nbytes:
            return key, buf
        del buf  # a wrong-sized buffer goes before the new one is allocated: never hold both
        return key, torch.empty(nbytes, dtype=torch.uint8, device=device)

    def give_back(self, key: Optional[tuple], buf: torch.Tensor) -> None:
        if key is None:
            return
        with self._lock:
            self._free[key] = buf

    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free.values())

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


POOL = BufferPool()


def release_buffers() -> None:
    """Free the buffers kept for the next push."""
    POOL.clear()


class PooledBuffer:
    """A leased pool buffer of exactly `nbytes`, tracked as live while leased; `release()` returns it (also
    done when the object is collected, e.g. after an exception)."""

    def __init__(self, role: str, nbytes: int, device=None, tracker: Optional[LiveBytes] = None):
        self.capacity = nbytes
        key, buf = POOL.lease(role, nbytes, device)
        view = buf[:nbytes]  # its own tensor object: the tracker's finalizer fires when the lease ends
        self.buffer = tracker.track(view) if tracker is not None else view
        self._done = weakref.finalize(self, POOL.give_back, key, buf)

    def release(self) -> None:
        self.buffer = None
        self._done()


class BucketBuffer(PooledBuffer):
    """The one reusable byte buffer of a push, sized for the largest bucket of the plan."""

    def __init__(self, plan: SyncPlan, device=None, tracker: Optional[LiveBytes] = None, role: str = "bucket"):
        super().__init__(role, plan.max_bucket_nbytes, device, tracker)

    def bucket(self, plan: BucketPlan) -> Bucket:
        return Bucket(plan, self.buffer[:plan.nbytes])
