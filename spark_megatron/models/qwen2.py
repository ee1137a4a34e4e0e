"""Megatron-core GPTModel provider for HF Qwen2 / Qwen2.5 causal LMs.

QKV bias, RMSNorm, SwiGLU, RoPE theta, GQA and tied/untied embeddings come from the HF config. Transformer
Engine layer specs are used when TE imports (GPU), the local spec otherwise (CPU/dev).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""model.params_dtype -> the dtype Megatron stages are built in."""


class ModelSpecError(ValueError):
    """An HF config this provider cannot build, or a parallel layout that does not divide it."""


def read_config_json(path) -> tuple:
    """A config.json file, or an HF checkpoint directory holding one -> (config dict, file path); ModelSpecError
    naming the file when it is missing or not JSON."""
    p = Path(path)
    if p.is_dir() or not p.suffix:
        p = p / "config.json"
    if not p.is_file():
        raise ModelSpecError(f"{path}: no config.json (not an HF checkpoint directory)")
    try:
        return json.loads(p.read_text()), p
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{p}: invalid JSON ({e})") from None


@dataclass
class TextModelShape:
    """The architecture facts the provider, the mappings and the planner need (read from config.json)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "TextModelShape":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelSpecError(f"{source}: unsupported architecture '{arch}' "
                                 f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        return cls(architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                   num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads),
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                   max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))

    @classmethod
    def from_hf_dir(cls, hf_dir) -> "TextModelShape":
        cfg, path = read_config_json(hf_dir)
        return cls.from_hf_dict(cfg, str(path))


def padded_vocab_size(vocab: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Pad to a multiple of `divisible_by` that TP also divides; independent of TP when TP | divisible_by,
    which keeps dist-checkpoints reshardable across TP sizes."""
    unit = divisible_by if divisible_by % tp == 0 else divisible_by * tp
    return -(-vocab // unit) * unit


def check_parallel_layout(shape: TextModelShape, tp: int, pp: int, divisible_by: int = 128) -> None:
    """Raise ModelSpecError naming the first quantity the layout does not divide."""
    problems = []
    if shape.num_heads % tp:
        problems.append(f"TP {tp} does not divide num_attention_heads {shape.num_heads}")
    if shape.num_kv_heads % tp:
        problems.append(f"TP {tp} does not divide num_key_value_heads {shape.num_kv_heads}")
    if shape.intermediate_size % tp:
        problems.append(f"TP {tp} does not divide intermediate_size {shape.intermediate_size}")
    if shape.num_layers % pp:
        problems.append(f"PP {pp} does not divide num_hidden_layers {shape.num_layers}")
    if padded_vocab_size(shape.vocab_size, divisible_by, tp) % tp:
        problems.append(f"TP {tp} does not divide the padded vocab")
    if problems:
        raise ModelSpecError("; ".join(problems))


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401  (GPU-only dependency)
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False


def transformer_config(shape: TextModelShape, tp: int = 1, pp: int = 1, params_dtype: str = "float32",
                       fp8: Optional[str] = None, recompute: bool = False, sequence_parallel: bool = False,
                       init_weights: bool = True):
    """megatron TransformerConfig equivalent to the HF Qwen2 config.

    init_weights=False skips the random initialisation (parameters are left uninitialised): for stages whose
    every parameter is about to be loaded from a checkpoint, where init is pure cost (~0.5 s per 50M params).
    """
    from megatron.core.transformer import TransformerConfig

    if params_dtype not in PARAMS_DTYPES:
        raise ModelSpecError(f"params_dtype must be one of {list(PARAMS_DTYPES)}, got '{params_dtype}'")
    if fp8 and not have_transformer_engine():
        raise ModelSpecError(f"fp8='{fp8}' needs Transformer Engine on a CUDA GPU (not available here)")
    dtype = PARAMS_DTYPES[params_dtype]
    kw = dict(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_heads, num_query_groups=shape.num_kv_heads, kv_channels=shape.head_dim,
        normalization="RMSNorm", layernorm_epsilon=shape.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, pipeline_dtype=dtype, use_cpu_initialization=True,
        attention_softmax_in_fp32=True, perform_initialization=init_weights,
    )
    if recompute:
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if fp8:
        kw.update(fp8="hybrid" if fp8 == "delayed" else "e4m3",
                  fp8_recipe={"delayed": "delayed", "tensorwise": "tensorwise",
                              "blockwise": "blockwise"}.get(fp8, fp8))
    return TransformerConfig(**kw)


def layer_spec(use_te: Optional[bool] = None):
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)

    use_te = have_transformer_engine() if use_te is None else use_te
    return get_gpt_layer_with_transformer_engine_spec() if use_te else get_gpt_layer_local_spec(
        normalization="RMSNorm")


def build_gpt_model(shape: TextModelShape, config, pre_process: bool, post_process: bool,
                    divisible_by: int = 128, vp_stage: Optional[int] = None, use_te: Optional[bool] = None):
    """One pipeline stage of the Qwen2 model (call inside initialised Megatron parallel state)."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config, transformer_layer_spec=layer_spec(use_te),
        vocab_size=padded_vocab_size(shape.vocab_size, divisible_by, config.tensor_model_parallel_size),
        max_sequence_length=shape.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=shape.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=int(shape.rope_theta), rotary_percent=1.0, parallel_output=True, vp_stage=vp_stage)


def model_provider(shape: TextModelShape, params_dtype: str = "float32", fp8: Optional[str] = None,
                   recompute: bool = False, divisible_by: int = 128, init_weights: bool = True):
    """Return `provider(pre_process, post_process, vp_stage=None)` for the current parallel state."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    check_parallel_layout(shape, tp, pp, divisible_by)
    config = transformer_config(shape, tp, pp, params_dtype, fp8, recompute, init_weights=init_weights)

    def provider(pre_process=True, post_process=True, vp_stage=None):
        return build_gpt_model(shape, config, pre_process, post_process, divisible_by, vp_stage)

    return provider


def on_compute_device(model):
    """`model` moved to the compute device, unless it was built on the meta device (a skeleton: its layout and
    sharded state dict are known, it holds no memory)."""
    from spark_megatron.parallel.cpu_compat import compute_device

    first = next(model.parameters(), None)
    return model if first is not None and first.is_meta else model.to(compute_device())


def build_stage(shape: TextModelShape, params_dtype: str = "float32", **kw):
    """The local pipeline stage as a plain module (no DDP wrapper), on the compute device; built under
    `torch.device("meta")` it stays there."""
    from megatron.core import parallel_state as ps

    provider = model_provider(shape, params_dtype, **kw)
    return on_compute_device(provider(pre_process=ps.is_pipeline_first_stage(),
                                      post_process=ps.is_pipeline_last_stage()))
