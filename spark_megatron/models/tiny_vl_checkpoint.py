"""Tiny random-weight Qwen2.5-VL checkpoints (config, safetensors, tokenizer, image processor config).

Same tokenizer as the tiny text model (it already carries <|vision_start|>, <|image_pad|>, <|vision_end|>,
<|video_pad|>), a vision tower with windowed and full-attention blocks, and an mRoPE language model whose
head_dim is 32 so vLLM's CPU attention could serve it. Built in ~2 s.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TinyQwen25VLSpec:
    """Shape of a tiny Qwen2.5-VL; defaults keep a forward with two images in tens of milliseconds on CPU."""

    hidden_size: int = 128
    """Language-model hidden size (also the vision merger's output size)."""
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    """Text heads; head_dim = hidden_size / heads = 32 (HF Qwen2.5-VL derives head_dim this way)."""
    num_key_value_heads: int = 2
    mrope_section: tuple = (4, 6, 6)
    """Temporal / height / width split of the rotary half-dim; sums to head_dim / 2."""
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_depth: int = 4
    vision_num_heads: int = 4
    """Vision head_dim = 64 / 4 = 16."""
    fullatt_block_indexes: tuple = (1, 3)
    window_size: int = 56
    """Pixels; 56 / patch 14 / merge 2 = windows of 2x2 merged tokens, so small test images span windows."""
    min_pixels: int = 28 * 28
    max_pixels: int = 28 * 28 * 64
    """Image processor bounds (qwen-vl-utils semantics); small so tests stay fast."""
    seed: int = 0
    extra: dict = field(default_factory=dict)
    """Additional top-level config.json keys (tests)."""


def write_preprocessor_config(out: Path, min_pixels: int, max_pixels: int) -> None:
    """The HF Qwen2-VL image-processor config (OpenAI CLIP normalisation, patch 14, merge 2, temporal 2)."""
    cfg = {
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=1))


def write_tiny_qwen2_5_vl(out_dir, spec: TinyQwen25VLSpec | None = None) -> Path:
    """Write a random-weight Qwen2_5_VLForConditionalGeneration checkpoint; returns the directory."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from spark_megatron.models.tiny_checkpoint import build_tokenizer

    spec = spec or TinyQwen25VLSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>")}
    text = dict(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                num_key_value_heads=spec.num_key_value_heads, rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                                 "mrope_section": list(spec.mrope_section)},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
                tie_word_embeddings=spec.tie_word_embeddings)
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size, hidden_act="silu",
                  intermediate_size=spec.vision_intermediate_size, num_heads=spec.vision_num_heads,
                  in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=spec.window_size, out_hidden_size=spec.hidden_size,
                  fullatt_block_indexes=list(spec.fullatt_block_indexes), tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=spec.tie_word_embeddings,
                           torch_dtype="float32", **spec.extra)
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    with torch.no_grad():  # HF init leaves biases at zero and norms at one; randomise so parity can fail
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id).save_pretrained(str(out))
    write_preprocessor_config(out, spec.min_pixels, spec.max_pixels)
    (out / "spark_tiny.json").write_text(json.dumps({k: (list(v) if isinstance(v, tuple) else v)
                                                     for k, v in spec.__dict__.items()}, indent=1))
    return out
