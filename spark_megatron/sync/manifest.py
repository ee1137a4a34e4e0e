"""What a weight update carries, before any tensor moves: tensor specs, reload units and the bucket plan.

A rollout engine reloads weights module by module: vLLM buffers the tensors of one of its modules and processes
(packs, repacks for the CPU kernels) the module once all of them arrived in one reload call. A reload call that
carries only part of a module's tensors leaves garbage in the rest (q without k/v, or the qkv biases without the
qkv weights). So the unit of transfer is the *module*, after the engine's packed-module renaming
(q_proj/k_proj/v_proj -> qkv_proj, gate_proj/up_proj -> gate_up_proj), and a bucket never splits a unit.

The plan is pure metadata (names, shapes, dtypes): every rank can compute it and the engine can validate all of
it before the first byte is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

# HF module names the engine fuses into one module (vLLM's `packed_modules_mapping` of Qwen2 / Qwen2.5-VL).
DEFAULT_PACKED_MODULES: Mapping[str, tuple] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}

ALIGN_BYTES = 64
"""Byte alignment of tensors inside a bucket (any dtype view of the flat buffer stays aligned)."""


class PlanError(ValueError):
    """A stream whose order cannot be bucketed without splitting a reload unit."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one HF-named tensor of an update."""

    name: str
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize  # not torch.empty(()).element_size(): a tensor per call, in hot loops
        for d in self.shape:
            n *= int(d)
        return n

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        return cls(name, tuple(int(d) for d in t.shape), t.dtype)

    def describe(self) -> str:
        return f"{tuple(self.shape)} {str(self.dtype).replace('torch.', '')}"


def module_key(name: str, packed: Mapping[str, Sequence[str]] = DEFAULT_PACKED_MODULES) -> str:
    """HF tensor name -> the engine module it loads into ('...q_proj.bias' -> '...qkv_proj')."""
    module = name.rpartition(".")[0]
    head, _, leaf = module.rpartition(".")
    for fused, members in packed.items():
        if leaf in members:
            leaf = fused
            break
    return f"{head}.{leaf}" if head else leaf


def grouped_by_module(names: Sequence[str], packed: Mapping = DEFAULT_PACKED_MODULES) -> list:
    """Reorder names so each engine module's tensors are consecutive (modules in order of first appearance).

    For random-access sources (state dicts, checkpoints), whose natural order is often alphabetical."""
    groups: dict = {}
    for n in names:
        groups.setdefault(module_key(n, packed), []).append(n)
    return [n for members in groups.values() for n in members]


def reload_units(specs: Sequence[TensorSpec], packed: Mapping = DEFAULT_PACKED_MODULES) -> list:
    """Split an ordered stream into units: maximal runs of consecutive tensors of one engine module.

    Raises PlanError when a module comes back after another module started (the stream would have to be
    reordered, i.e. buffered, to keep the module whole).
    """
    units, seen = [], set()
    for spec in specs:
        key = module_key(spec.name, packed)
        if units and units[-1][0] == key:
            units[-1][1].append(spec)
            continue
        if key in seen:
            raise PlanError(f"tensor '{spec.name}': module '{key}' was interrupted by another module in the "
                            f"stream; its tensors must be consecutive")
        seen.add(key)
        units.append((key, [spec]))
    return [tuple(u[1]) for u in units]


def aligned(n: int) -> int:
    """`n` bytes rounded up to the alignment every tensor starts at in a bucket (ALIGN_BYTES)."""
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


@dataclass(frozen=True)
class BucketPlan:
    """One bucket: its tensors, their byte offsets in the flat buffer, and which stream produces it."""

    index: int
    specs: tuple
    offsets: tuple
    nbytes: int
    source: int = 0
    """Index of the producing stream (pipeline stage / model chunk) in `SyncPlan.sources`."""


@dataclass(frozen=True)
class SyncPlan:
    """The ordered buckets of one weight update."""

    buckets: tuple
    bucket_bytes: int
    """Requested bucket size; a single unit larger than this gets a bucket of its own."""
    sources: tuple = (0,)
    """Opaque ids of the producing streams (global rank of each stage's leader for actor pushes)."""

    @property
    def specs(self) -> list:
        return [s for b in self.buckets for s in b.specs]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for b in self.buckets for s in b.specs)

    @property
    def max_bucket_nbytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)


def plan_buckets(streams: Sequence[Sequence[TensorSpec]], bucket_bytes: int, sources: Optional[Sequence] = None,
                 packed: Mapping = DEFAULT_PACKED_MODULES) -> SyncPlan:
    """Pack each stream's units greedily, in order, into buckets of at most `bucket_bytes`.

    Buckets never span two streams (each is produced by one stage) and never split a unit.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    buckets: list = []
    for src_idx, specs in enumerate(streams):
        cur, offsets, size = [], [], 0
        for unit in reload_units(specs, packed):
            unit_bytes = sum(aligned(s.nbytes) for s in unit)
            if cur and size + unit_bytes > bucket_bytes:
                buckets.append(BucketPlan(len(buckets), tuple(cur), tuple(offsets), size, src_idx))
                cur, offsets, size = [], [], 0
            for s in unit:
                cur.append(s)
                offsets.append(size)
                size += aligned(s.nbytes)
        if cur:
            buckets.append(BucketPlan(len(buckets), tuple(cur), tuple(offsets), size, src_idx))
    return SyncPlan(tuple(buckets), bucket_bytes, tuple(sources) if sources is not None
                    else tuple(range(len(streams))))


def stage_specs(model, registry, tied: bool = False, dtype: Optional[torch.dtype] = None) -> list:
    """Specs `export_hf_weights(model, registry, tied, dtype)` will yield, computed on meta tensors (no gather).

    Mirrors the export: TP-gathered full shape = local shape with the split dim times the TP size, then the
    mapping's own `full_to_hf` on a meta tensor gives the HF shapes.
    """
    from megatron.core import parallel_state as ps

    from spark_megatron.models.weights import mapping_for, global_param_names

    tp = ps.get_tensor_model_parallel_world_size()
    out = []
    for name, param in global_param_names(model):
        if tied and name.endswith("output_layer.weight"):
            continue
        mapping, layer = mapping_for(registry, name, tied)
        shape = list(param.shape)
        if mapping.tp_dim is not None and tp > 1:
            shape[mapping.tp_dim] *= tp
        full = torch.empty(shape, dtype=dtype or param.dtype, device="meta")
        _, hf_names = mapping.resolve(layer)
        for hf_name, t in zip(hf_names, mapping.full_to_hf(full)):
            out.append(TensorSpec(hf_name, tuple(int(d) for d in t.shape), t.dtype))
    return out
