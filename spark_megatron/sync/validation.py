"""Check a whole weight update against what the engine holds, before anything is written into it.

The expected table (HF name -> shape, dtype) comes from the engine's own checkpoint directory: shapes from the
safetensors headers, names cross-checked against the model family's MappingRegistry, dtype = the engine's
compute dtype. A plan is rejected, with an error naming the tensor, if it carries an unknown name, a wrong
shape/dtype, a duplicate, a reload unit (engine module) that is incomplete inside its bucket, or (by default) if
it leaves any engine tensor out.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from spark_megatron.sync.manifest import DEFAULT_PACKED_MODULES, SyncPlan, TensorSpec, module_key


class WeightValidationError(ValueError):
    """A weight update that does not fit the engine; raised before any tensor is written."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def checkpoint_shapes(hf_dir) -> dict:
    """HF name -> shape from the safetensors headers of a checkpoint directory (no tensor is read)."""
    from safetensors import safe_open

    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise WeightValidationError(f"{d}: no model.safetensors or model.safetensors.index.json")
    shapes = {}
    for f in files:
        with safe_open(str(d / f), framework="pt") as h:
            for k in h.keys():
                shapes[k] = tuple(int(x) for x in h.get_slice(k).get_shape())
    return shapes


def _registry_names(hf_dir) -> Optional[list]:
    """Every HF name the model family's mappings define, or None when the family is not known here."""
    from spark_megatron.models.families import load_family
    from spark_megatron.models.qwen2 import ModelSpecError

    try:
        family, shape = load_family(hf_dir)
    except ModelSpecError:
        return None
    return family.mappings(shape).hf_names()


@dataclass
class ExpectedWeights:
    """The engine's tensor table and its reload units (engine modules)."""

    specs: dict
    """HF name -> TensorSpec the engine accepts."""
    packed: Mapping = field(default_factory=lambda: dict(DEFAULT_PACKED_MODULES))
    """Engine module fusion table (vLLM `packed_modules_mapping`)."""
    where: str = "the engine"
    """How error messages name the engine/model."""

    def __post_init__(self):
        self.units: dict = {}
        for name in self.specs:
            self.units.setdefault(module_key(name, self.packed), []).append(name)

    @classmethod
    def from_hf_dir(cls, hf_dir, dtype: torch.dtype, packed: Optional[Mapping] = None) -> "ExpectedWeights":
        shapes = checkpoint_shapes(hf_dir)
        names = _registry_names(hf_dir)
        if names is not None and set(names) != set(shapes):
            extra = sorted(set(shapes) - set(names))
            missing = sorted(set(names) - set(shapes))
            what = f"has unmapped tensor '{extra[0]}'" if extra else f"lacks mapped tensor '{missing[0]}'"
            raise WeightValidationError(f"{hf_dir}: checkpoint {what}; the engine's weight table would be wrong")
        specs = {n: TensorSpec(n, s, dtype) for n, s in shapes.items()}
        return cls(specs, dict(packed or DEFAULT_PACKED_MODULES), where=f"the engine's model ({hf_dir})")

    # ------------------------------------------------------------------------------------------ checks
    def check_spec(self, spec: TensorSpec) -> None:
        want = self.specs.get(spec.name)
        if want is None:
            close = difflib.get_close_matches(spec.name, list(self.specs), n=1)
            hint = f"; closest known name: '{close[0]}'" if close else ""
            raise WeightValidationError(f"weight update rejected: unknown tensor '{spec.name}' (not a parameter "
                                        f"of {self.where}){hint}")
        if tuple(spec.shape) != tuple(want.shape):
            raise WeightValidationError(f"weight update rejected: tensor '{spec.name}' has shape "
                                        f"{tuple(spec.shape)}, {self.where} expects {tuple(want.shape)}")
        if spec.dtype != want.dtype:
            raise WeightValidationError(f"weight update rejected: tensor '{spec.name}' has dtype "
                                        f"{_dtype_name(spec.dtype)}, {self.where} expects "
                                        f"{_dtype_name(want.dtype)} (export in the engine's dtype)")

    def check_unit_completeness(self, index: int, names: Sequence[str], all_names: set) -> None:
        """Every engine module touched by this bucket must be complete in it."""
        present = set(names)
        for key in dict.fromkeys(module_key(n, self.packed) for n in names):
            for member in self.units.get(key, ()):
                if member not in present:
                    where = "is in another bucket" if member in all_names else "is missing from the update"
                    raise WeightValidationError(
                        f"weight update rejected: tensor '{member}' of fused module '{key}' {where}; bucket "
                        f"{index} carries the rest of that module (a partial module leaves garbage in the engine)")

    def check_plan(self, plan: SyncPlan, require_all: bool = True) -> None:
        """Validate every tensor and bucket of a plan; raises WeightValidationError naming the tensor."""
        seen: set = set()
        for spec in plan.specs:
            if spec.name in seen:
                raise WeightValidationError(f"weight update rejected: tensor '{spec.name}' appears twice")
            seen.add(spec.name)
            self.check_spec(spec)
        for b in plan.buckets:
            self.check_unit_completeness(b.index, [s.name for s in b.specs], seen)
        if require_all:
            missing = [n for n in self.specs if n not in seen]
            if missing:
                raise WeightValidationError(f"weight update rejected: it lacks {len(missing)} of {len(self.specs)} "
                                            f"tensors of {self.where}, first '{missing[0]}'")
