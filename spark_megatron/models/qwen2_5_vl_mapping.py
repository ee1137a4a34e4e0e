"""Qwen2.5-VL HF <-> Megatron parameter table (vision tower + merger + mRoPE language model).

The table uses the hub checkpoints' names (`visual.*`, `model.*` for the language model, `lm_head.weight`), which
the published checkpoints carry and transformers 5 writes again on `save_pretrained`. Checkpoints saved by
transformers 4.52-4.5x name the same tensors as its modules do: `model.visual.*`, `model.language_model.*`,
`lm_head.weight` (transformers' conversion_mapping renames `^visual` -> `model.visual` and `^model` ->
`model.language_model` on load; vLLM's Qwen2.5-VL `hf_to_vllm_mapper` accepts both). `NAMING` converts between the
two schemes; conversion reads either and writes either. The vision MLP width is zero-padded in Megatron
(models/vision.py says why and how much); its mappings pad on import and strip on export, so conversion and
weight sync see HF's shapes.
"""
from __future__ import annotations

import torch

from spark_megatron.models.mapping import (ColumnParallelMapping, HFNaming, MappingError, MappingRegistry,
                                           PaddedGatedMLPMapping, PaddedRowParallelMapping, QKVMapping,
                                           ReplicatedMapping, RowParallelMapping)
from spark_megatron.models.qwen2_mapping import qwen2_mappings
from spark_megatron.models.vision import FFN_MULTIPLE, FFN_SHARD_MULTIPLE

VISION_MCORE = "vision_model."
LM_MCORE = "language_model."


class VisionQKVMapping(QKVMapping):
    """HF fused `attn.qkv` ([q; k; v] blocks of all heads) <-> Megatron per-head-interleaved linear_qkv."""

    def hf_to_full(self, hf):
        fused = hf[0]
        if fused.shape[0] % 3:
            raise MappingError(f"{self.hf[0]}: {fused.shape[0]} rows is not 3 x heads x head_dim")
        return super().hf_to_full(list(fused.chunk(3, dim=0)))

    def full_to_hf(self, full):
        return [torch.cat(super().full_to_hf(full), dim=0)]


def vision_layer_mappings(vshape, m: str, h: str) -> list:
    qkv = dict(num_heads=vshape.num_heads, num_kv_heads=vshape.num_heads, head_dim=vshape.head_dim)
    ffn = dict(size=vshape.intermediate_size, shard_multiple=FFN_SHARD_MULTIPLE, multiple=FFN_MULTIPLE)
    return [
        ReplicatedMapping(f"{m}input_layernorm.weight", (f"{h}norm1.weight",)),
        VisionQKVMapping(f"{m}self_attention.linear_qkv.weight", (f"{h}attn.qkv.weight",), **qkv),
        VisionQKVMapping(f"{m}self_attention.linear_qkv.bias", (f"{h}attn.qkv.bias",), **qkv),
        RowParallelMapping(f"{m}self_attention.linear_proj.weight", (f"{h}attn.proj.weight",)),
        ReplicatedMapping(f"{m}self_attention.linear_proj.bias", (f"{h}attn.proj.bias",)),
        ReplicatedMapping(f"{m}pre_mlp_layernorm.weight", (f"{h}norm2.weight",)),
        PaddedGatedMLPMapping(f"{m}mlp.linear_fc1.weight", (f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"),
                              **ffn),
        PaddedGatedMLPMapping(f"{m}mlp.linear_fc1.bias", (f"{h}mlp.gate_proj.bias", f"{h}mlp.up_proj.bias"), **ffn),
        PaddedRowParallelMapping(f"{m}mlp.linear_fc2.weight", (f"{h}mlp.down_proj.weight",), **ffn),
        ReplicatedMapping(f"{m}mlp.linear_fc2.bias", (f"{h}mlp.down_proj.bias",)),
    ]


def vision_mappings(vshape) -> list:
    v = VISION_MCORE
    return [
        ReplicatedMapping(f"{v}patch_embed_weight", ("visual.patch_embed.proj.weight",)),
        *vision_layer_mappings(vshape, f"{v}decoder.layers.*.", "visual.blocks.*."),
        ReplicatedMapping(f"{v}merger.ln_q.weight", ("visual.merger.ln_q.weight",)),
        ColumnParallelMapping(f"{v}merger.fc1.weight", ("visual.merger.mlp.0.weight",)),
        ColumnParallelMapping(f"{v}merger.fc1.bias", ("visual.merger.mlp.0.bias",)),
        RowParallelMapping(f"{v}merger.fc2.weight", ("visual.merger.mlp.2.weight",)),
        ReplicatedMapping(f"{v}merger.fc2.bias", ("visual.merger.mlp.2.bias",)),
    ]


class SectionedMappingRegistry(MappingRegistry):
    """A registry over several layer stacks with their own depth (vision blocks vs language layers).

    `sections` = [(megatron layer prefix, hf layer prefix, num_layers)]; lookups try each section's prefix, so
    `load_hf_weights` / `export_hf_weights` work unchanged with their default-prefix calls.
    """

    def __init__(self, mappings, sections: list, num_layers: int):
        super().__init__(mappings, num_layers)
        self.sections = list(sections)

    def _match(self, name: str, table: dict, which: int):
        for sec in self.sections:
            pattern, layer = self._split_layer(name, sec[which])
            if layer is not None and pattern in table:
                if not 0 <= layer < sec[2]:
                    raise MappingError(f"'{name}': layer {layer} out of range (stack has {sec[2]})")
                return table[pattern], layer
        if name in table:
            return table[name], None
        return None, None

    def for_megatron(self, name: str, layer_prefix: str = "") -> tuple:
        m, layer = self._match(name, self._by_mcore, 0)
        if m is None:
            raise MappingError(f"no mapping for Megatron parameter '{name}'")
        return m, layer

    def for_hf(self, name: str, layer_prefix: str = "") -> tuple:
        m, layer = self._match(name, self._by_hf, 1)
        if m is None:
            raise MappingError(f"unknown HF tensor '{name}'")
        return m, layer

    def hf_names(self) -> list:
        out = []
        for m in self.mappings:
            layers = [None]
            if m.per_layer:
                sec = next(s for s in self.sections if m.megatron.startswith(s[0]))
                layers = range(sec[2])
            for layer in layers:
                out.extend(m.resolve(layer)[1])
        return out


def qwen2_5_vl_mappings(shape, divisible_by: int = 128) -> SectionedMappingRegistry:
    """Every parameter of the VL model; `shape` is a `VLModelShape`."""
    lm = qwen2_mappings(shape.text, divisible_by, mcore_prefix=LM_MCORE, hf_prefix="model.")
    sections = [(f"{VISION_MCORE}decoder.layers.", "visual.blocks.", shape.vision.depth),
                (f"{LM_MCORE}decoder.layers.", "model.layers.", shape.text.num_layers)]
    return SectionedMappingRegistry(vision_mappings(shape.vision) + lm.mappings, sections, shape.text.num_layers)


NAMING = HFNaming(
    schemes=("hub", "transformers"),
    rules={"hub": (("visual.", "visual."), ("model.", "model."), ("lm_head.", "lm_head.")),
           "transformers": (("visual.", "model.visual."), ("model.", "model.language_model."),
                            ("lm_head.", "lm_head."))})
"""hub: the published checkpoints' names (canonical here); transformers: the module names of
Qwen2_5_VLForConditionalGeneration, which transformers 4.52-4.5x also wrote to checkpoints."""


def hf_module_name(checkpoint_name: str) -> str:
    """Hub checkpoint tensor name -> Qwen2_5_VLForConditionalGeneration state-dict key (transformers 5.x)."""
    return NAMING.to_scheme(checkpoint_name, "transformers")
