"""The Qwen2 / Qwen2.5 text model's HF <-> Megatron parameter table."""
from __future__ import annotations

from spark_megatron.models.mapping import (ColumnParallelMapping, GatedMLPMapping, MappingRegistry, QKVMapping,
                                           ReplicatedMapping, RowParallelMapping, VocabParallelMapping)
from spark_megatron.models.qwen2 import TextModelShape, padded_vocab_size


def qwen2_layer_mappings(shape: TextModelShape, mcore_prefix: str = "decoder.layers.*.",
                         hf_prefix: str = "model.layers.*.") -> list:
    """Per-layer mappings; the prefixes let the VL model reuse them for its language model."""
    m, h = mcore_prefix, hf_prefix
    qkv = dict(num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim)
    attn = [f"{h}self_attn.{p}_proj" for p in "qkv"]
    return [
        ReplicatedMapping(f"{m}input_layernorm.weight", (f"{h}input_layernorm.weight",)),
        QKVMapping(f"{m}self_attention.linear_qkv.weight", tuple(a + ".weight" for a in attn), **qkv),
        QKVMapping(f"{m}self_attention.linear_qkv.bias", tuple(a + ".bias" for a in attn), **qkv),
        RowParallelMapping(f"{m}self_attention.linear_proj.weight", (f"{h}self_attn.o_proj.weight",)),
        ReplicatedMapping(f"{m}pre_mlp_layernorm.weight", (f"{h}post_attention_layernorm.weight",)),
        GatedMLPMapping(f"{m}mlp.linear_fc1.weight", (f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight")),
        RowParallelMapping(f"{m}mlp.linear_fc2.weight", (f"{h}mlp.down_proj.weight",)),
    ]


def qwen2_mappings(shape: TextModelShape, divisible_by: int = 128, mcore_prefix: str = "",
                   hf_prefix: str = "model.", lm_head: str = "lm_head.weight") -> MappingRegistry:
    vocab = dict(vocab_size=shape.vocab_size, padded_vocab_size=padded_vocab_size(shape.vocab_size, divisible_by))
    mappings = [VocabParallelMapping(f"{mcore_prefix}embedding.word_embeddings.weight",
                                     (f"{hf_prefix}embed_tokens.weight",), **vocab)]
    mappings += qwen2_layer_mappings(shape, f"{mcore_prefix}decoder.layers.*.", f"{hf_prefix}layers.*.")
    mappings.append(ReplicatedMapping(f"{mcore_prefix}decoder.final_layernorm.weight", (f"{hf_prefix}norm.weight",)))
    if not shape.tie_word_embeddings:
        mappings.append(VocabParallelMapping(f"{mcore_prefix}output_layer.weight", (lm_head,), **vocab))
    return MappingRegistry(mappings, shape.num_layers)


# TE specs fuse the pre-attention / pre-MLP norms into the following linear; same tensor, other module name.
TE_FUSED_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def canonical_megatron_name(name: str) -> str:
    """Map TE-spec parameter names onto the local-spec names the tables use."""
    for local, te in TE_FUSED_NORM_NAMES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


__all__ = ["qwen2_mappings", "qwen2_layer_mappings", "canonical_megatron_name", "ColumnParallelMapping"]
