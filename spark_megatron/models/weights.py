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

from spark_megatron.models.hf_files import CheckpointError, SafetensorsFile, TensorInfo
from spark_megatron.models.mapping import MappingError, MappingRegistry

__all__ = ["CheckpointError", "HFCheckpointReader", "load_hf_weights", "export_hf_weights", "global_param_names"]


class HFCheckpointReader:
    """Lazy, validated access to the tensors of an HF safetensors checkpoint directory.

    Every shard's header is parsed up front (a missing, truncated or inconsistent file is named at once); tensors
    are zero-copy views of a private mmap (`get`), whose pages `release` drops again. With a family's `naming`
    (several tensor-name schemes, e.g. Qwen2.5-VL's hub vs transformers-4.52 names), the scheme the files use is
    detected and every name is served in the canonical scheme the mappings use.
    """

    def __init__(self, hf_dir, naming=None, known_names=None):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
        elif (self.dir / "model.safetensors").is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._files, raw_where = {}, {}
        for f in files:
            path = self.dir / f
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in the index is missing")
            self._files[f] = SafetensorsFile(path)
            for k in self._files[f].keys():
                raw_where[k] = f
        if weight_map:
            missing = [k for k, f in weight_map.items() if raw_where.get(k) != f]
            if missing:
                raise CheckpointError(f"{self.dir}: index lists {len(missing)} tensors not found in their shard, "
                                      f"e.g. '{missing[0]}'")
        self.naming, self.scheme = naming, None
        self._raw = {k: k for k in raw_where}
        if naming is not None:
            self.scheme = naming.detect(list(raw_where), set(known_names or ()), str(self.dir))
            self._raw = {naming.to_canonical(k, self.scheme) or k: k for k in raw_where}
        self._where = {name: raw_where[raw] for name, raw in self._raw.items()}
        """canonical tensor name -> shard file name"""

    def keys(self) -> list:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor '{name}' not in checkpoint")
        return self._files[self._where[name]].tensors[self._raw[name]]

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a view of its file's private mapping (copy-on-write: writing to it never changes the
        file); pages are read when touched."""
        self.info(name)
        return self._files[self._where[name]].view(self._raw[name])

    def rows(self, name: str, row0: int, nrows: int):
        """Rows [row0, row0 + nrows) (dim 0) of a tensor as a Piece of its file's mapping."""
        self.info(name)
        return self._files[self._where[name]].rows(self._raw[name], row0, nrows)

    def release(self, name: Optional[str] = None) -> None:
        """Drop one tensor's pages (or every file's) from this process's resident memory."""
        if name is None:
            for f in self._files.values():
                f.release()
        elif name in self._where:
            self._files[self._where[name]].release(self._raw[name])

    def nbytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in self._files)


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


def tp_rank_and_size() -> tuple:
    """(this rank's tensor-parallel rank, the tensor-parallel size)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def mapping_for(registry: MappingRegistry, name: str, tied: bool):
    """The mapping of a Megatron parameter name (canonical spelling; with tied embeddings, the last pipeline
    stage's own copy of the embedding maps as the embedding)."""
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
    tp_rank, tp_size = tp_rank_and_size()
    loaded = 0
    for name, param in global_param_names(model):
        mapping, layer = mapping_for(registry, name, tied)
        _, hf_names = mapping.resolve(layer)
        fill_shard(param, [reader.get(h) for h in hf_names], mapping, tp_rank, tp_size, name, hf_names)
        loaded += 1
    return loaded


def fill_shard(dst: torch.Tensor, hf: list, mapping, tp_rank: int, tp_size: int, name: str, hf_names) -> None:
    """Write this TP rank's shard of one parameter into `dst` (the parameter, or a buffer shaped like it) from
    its HF tensors: slice by slice where the mapping is a pure permutation, else through the mapping's functions."""
    with torch.no_grad():
        if _copy_own_segments(dst, hf, mapping, tp_rank, tp_size):
            return
        shard = mapping.hf_to_shard(hf, tp_rank, tp_size)
        if tuple(shard.shape) != tuple(dst.shape):
            raise MappingError(f"{name} <- {tuple(hf_names)}: shard shape {tuple(shard.shape)} != parameter "
                               f"{tuple(dst.shape)}")
        dst.copy_(shard.to(dst.dtype))


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
        mapping, layer = mapping_for(registry, name, tied)
        full = gather_tp(param.detach(), mapping)
        _, hf_names = mapping.resolve(layer)
        for hf_name, t in zip(hf_names, mapping.full_to_hf(full)):
            yield hf_name, (t.to(dtype) if dtype is not None else t).contiguous()
