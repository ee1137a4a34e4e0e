"""Move weights between HF safetensors and Megatron model stages, one tensor at a time.

`HFCheckpointReader` validates a checkpoint up front (every shard present and readable) and serves tensors
lazily; `load_hf_weights` fills the local TP/PP shard of a Megatron stage; `export_hf_weights` streams the local
stage as (hf_name, tensor) pairs after gathering TP shards, so nothing ever holds more than one full parameter.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch

from spark_megatron.models.mapping import MappingError, MappingRegistry


class CheckpointError(ValueError):
    """A missing, corrupt or incomplete checkpoint file."""


class HFCheckpointReader:
    """Lazy, validated access to the tensors of an HF safetensors checkpoint directory."""

    def __init__(self, hf_dir):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
        elif (self.dir / "model.safetensors").is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles, self._where = {}, {}
        for f in files:
            path = self.dir / f
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in the index is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
                raise CheckpointError(f"{path}: corrupt safetensors file ({type(e).__name__}: {e})") from None
            self._handles[f] = handle
            for k in keys:
                self._where[k] = f
        if weight_map:
            missing = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if missing:
                raise CheckpointError(f"{self.dir}: index lists {len(missing)} tensors not found in their shard, "
                                      f"e.g. '{missing[0]}'")

    def keys(self) -> list:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor '{name}' not in checkpoint")
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.dir / self._where[name]}: cannot read '{name}' ({e})") from None

    def nbytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in self._handles)


def _layer_stacks(model) -> dict:
    """'<path>.layers.' -> {local index: global index} for every megatron TransformerBlock-like stack."""
    stacks = {}
    for path, mod in model.named_modules():
        layers = getattr(mod, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and layers and all(hasattr(m, "layer_number") for m in layers):
            stacks[f"{path}.layers." if path else "layers."] = {i: m.layer_number - 1 for i, m in enumerate(layers)}
    return stacks


def global_param_names(model, layer_prefix: Optional[str] = None) -> Iterator[tuple]:
    """Yield (global_name, param) for a Megatron stage: local layer indices become global ones.

    Every layer stack is renumbered (`decoder.layers.` of a GPTModel; `language_model.decoder.layers.` and
    `vision_model.decoder.layers.` of a VL stage); `layer_prefix` restricts renumbering to one stack.
    """
    stacks = _layer_stacks(model)
    if layer_prefix is not None:
        stacks = {layer_prefix: stacks.get(layer_prefix, {})}
    for name, p in model.named_parameters():
        for prefix, offsets in stacks.items():
            if name.startswith(prefix):
                idx, _, tail = name[len(prefix):].partition(".")
                name = f"{prefix}{offsets[int(idx)]}.{tail}"
                break
        yield name, p


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _mapping_for(registry: MappingRegistry, name: str, tied: bool):
    from spark_megatron.models.qwen2_mapping import canonical_megatron_name

    name = canonical_megatron_name(name)
    if tied and name.endswith("output_layer.weight"):  # PP>1 tied: last stage keeps its own copy of the embedding
        name = name.replace("output_layer.weight", "embedding.word_embeddings.weight")
    return registry.for_megatron(name)


@torch.no_grad()
def load_hf_weights(model, reader: HFCheckpointReader, registry: MappingRegistry, tied: bool = False) -> int:
    """Copy this rank's shard of every parameter of `model` (one pipeline stage) from HF tensors.

    Returns the number of parameters loaded; raises MappingError/CheckpointError naming the tensor on mismatch.
    """
    tp_rank, tp_size = _tp()
    loaded = 0
    for name, param in global_param_names(model):
        mapping, layer = _mapping_for(registry, name, tied)
        _, hf_names = mapping.resolve(layer)
        hf = [reader.get(h) for h in hf_names]
        if not _copy_own_segments(param, hf, mapping, tp_rank, tp_size):
            shard = mapping.hf_to_shard(hf, tp_rank, tp_size)
            if tuple(shard.shape) != tuple(param.shape):
                raise MappingError(f"{name} <- {hf_names}: shard shape {tuple(shard.shape)} != parameter "
                                   f"{tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
        loaded += 1
    return loaded


def _copy_own_segments(param: torch.Tensor, hf: list, mapping, tp_rank: int, tp_size: int) -> bool:
    """Copy this rank's slices of the HF tensors straight into `param` (one pass, no fused or full-size
    temporaries), when the mapping is a pure slice permutation whose slices cover the whole shard (a zero-padded
    mapping is not: its padding must come from the mapping). False: the caller uses the mapping's functions."""
    from spark_megatron.models.layout import derive_layout, hf_shapes, layout_fits

    shard_shape = tuple(int(d) for d in param.shape)
    layout, shapes = derive_layout(mapping, shard_shape, tp_size), hf_shapes(mapping, shard_shape, tp_size)
    if not layout_fits(layout, shard_shape, shapes):
        return False
    if any(tuple(t.shape) != tuple(shape) for t, shape in zip(hf, shapes)):
        return False  # the mapping's own path names the mismatch
    dim = layout[0].dim
    mine = [(out, t, seg) for out, t in zip(layout, hf) for seg in out.segments if seg.rank == tp_rank]
    if sum(seg.length for _, _, seg in mine) != shard_shape[dim]:
        return False
    for out, t, seg in mine:
        off = seg.dst
        for start, length in seg.src:
            param.narrow(dim, start, length).copy_(t.narrow(out.dim, off, length))
            off += length
    return True


def gather_tp(shard: torch.Tensor, mapping) -> torch.Tensor:
    """All-gather a TP-sharded parameter within the TP group and rebuild the unsharded tensor."""
    from megatron.core import parallel_state as ps

    tp_size = ps.get_tensor_model_parallel_world_size()
    if mapping.tp_dim is None or tp_size == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    return mapping.gather_shards(parts)


@torch.no_grad()
def export_hf_weights(model, registry: MappingRegistry, tied: bool = False,
                      dtype: Optional[torch.dtype] = None) -> Iterator[tuple]:
    """Stream (hf_name, tensor) for this pipeline stage; every TP rank of the stage must iterate it together.

    A fused Megatron parameter yields its whole HF group (q, k, v / gate, up) consecutively, so consumers that
    bucket the stream never split a group unless they cut inside one parameter's outputs.
    """
    for name, param in global_param_names(model):
        if tied and name.endswith("output_layer.weight"):
            continue  # HF ties lm_head to the embedding; the first stage exports it
        mapping, layer = _mapping_for(registry, name, tied)
        full = gather_tp(param.detach(), mapping)
        _, hf_names = mapping.resolve(layer)
        for hf_name, t in zip(hf_names, mapping.full_to_hf(full)):
            yield hf_name, (t.to(dtype) if dtype is not None else t).contiguous()
