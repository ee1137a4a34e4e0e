"""Per-rank parameter inventory of a Qwen2 / Qwen2.5-VL actor, computed from the HF config alone.

The planner must size a 32B model without building it, so this module lists, for one (TP, PP) rank, every
parameter tensor Megatron creates on that rank, in module-registration order (the order Megatron's DDP uses to
lay out its buffers): word embedding (vocab-parallel, first stage), per layer the input norm, the row-parallel
attention projection, the column-parallel fused QKV weight and bias, the pre-MLP norm, the fused gate+up fc1
(2 x ffn) and fc2; the final norm and the output layer on the last stage (on the last stage also when the
embedding is tied and PP > 1: Megatron keeps a synchronised copy there). A VL model's vision tower sits on the
first stage, its MLP width zero-padded exactly as spark_megatron.models.vision pads it (`vision_ffn_size`).

Names follow Megatron's local layer spec (`input_layernorm`, `pre_mlp_layernorm`), which is what runs on CPU and
what the distributed test compares against; the TE spec fuses those norms into `linear_qkv`/`linear_fc1` as
`layer_norm_weight` but holds the same numbers of elements.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from spark_megatron.models.qwen2 import ModelSpecError, TextModelShape, padded_vocab_size, read_config_json
from spark_megatron.models.vision import vision_ffn_size

TEXT_ARCHITECTURES = ("Qwen2ForCausalLM",)
VL_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)


@dataclass(frozen=True)
class VisionShape:
    """Qwen2.5-VL vision tower (ViT with windowed attention + 2x2 patch merger), from `vision_config`."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int

    @classmethod
    def from_hf_dict(cls, vc: dict, source: str) -> "VisionShape":
        try:
            return cls(depth=vc["depth"], hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
                       num_heads=vc["num_heads"], in_channels=vc.get("in_channels", vc.get("in_chans", 3)),
                       patch_size=vc.get("patch_size", vc.get("spatial_patch_size", 14)),
                       temporal_patch_size=vc.get("temporal_patch_size", 2),
                       spatial_merge_size=vc.get("spatial_merge_size", 2), out_hidden_size=vc["out_hidden_size"])
        except KeyError as e:
            raise ModelSpecError(f"{source}: vision_config lacks {e}") from None

@dataclass(frozen=True)
class ModelArchitecture:
    """Everything the planner needs to know about a model: the language model and, for VL, the vision tower."""

    architecture: str
    text: TextModelShape
    vision: Optional[VisionShape]
    source: str
    """Where the facts were read from (a config.json path), for error messages and the report."""
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)
    """The raw HF config, for the model family's own layout check."""

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "ModelArchitecture":
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = archs[0]
        if arch in TEXT_ARCHITECTURES:
            return cls(arch, TextModelShape.from_hf_dict(cfg, source), None, source, cfg)
        if arch in VL_ARCHITECTURES:
            # transformers >= 5 nests the language model under text_config; the published configs are flat
            text_cfg = dict(cfg.get("text_config") or cfg)
            text_cfg.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
            text_cfg["architectures"] = list(TEXT_ARCHITECTURES)
            if "vision_config" not in cfg:
                raise ModelSpecError(f"{source}: {arch} config has no vision_config")
            return cls(arch, TextModelShape.from_hf_dict(text_cfg, source),
                       VisionShape.from_hf_dict(cfg["vision_config"], source), source, cfg)
        raise ModelSpecError(f"{source}: unsupported architecture '{arch}' "
                             f"(supported: {', '.join(TEXT_ARCHITECTURES + VL_ARCHITECTURES)})")

    @classmethod
    def from_path(cls, path) -> "ModelArchitecture":
        """A config.json file, or an HF checkpoint directory holding one."""
        cfg, p = read_config_json(path)
        return cls.from_hf_dict(cfg, str(p))


@dataclass(frozen=True)
class ParamEntry:
    """One parameter tensor as it exists on one rank."""

    name: str
    numel: int
    """Elements on this rank (after TP sharding)."""
    full_numel: int
    """Elements of the unsharded tensor."""
    norm: bool = False
    """A norm weight (TE fuses these into the following GEMM; same element count)."""
    frozen: bool = False
    """requires_grad=False (frozen vision tower): no gradient buffer, no optimizer state."""
    shared_embedding: bool = False
    """Megatron's `shared_embedding` attribute (tied embedding split across PP): gets its own DDP bucket."""
    linear: bool = False
    """A GEMM weight (what FP8 recipes cast to FP8)."""
    padding: int = 0
    """Elements of `full_numel` that are Megatron's zero padding, absent from the HF model (vocab rows beyond
    the vocabulary, vision MLP units beyond intermediate_size)."""


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    """Decoder layers held by a pipeline stage (even split; the provider requires PP | layers)."""
    per = num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def _linear(name, out_f, in_f, tp, split_out, bias=False, bias_sharded=True):
    """A column-parallel (split_out) or row-parallel linear: weight [out, in] and optional bias."""
    local_w = (out_f // tp) * in_f if split_out else out_f * (in_f // tp)
    entries = [ParamEntry(f"{name}.weight", local_w, out_f * in_f, linear=True)]
    if bias:
        local_b = out_f // tp if (split_out and bias_sharded) else out_f
        entries.append(ParamEntry(f"{name}.bias", local_b, out_f))
    return entries


def decoder_layer_params(shape: TextModelShape, tp: int, prefix: str) -> list:
    h, d = shape.hidden_size, shape.head_dim
    qkv_out = (shape.num_heads + 2 * shape.num_kv_heads) * d
    out = [ParamEntry(f"{prefix}.input_layernorm.weight", h, h, norm=True)]
    out += _linear(f"{prefix}.self_attention.linear_proj", h, shape.num_heads * d, tp, split_out=False)
    out += _linear(f"{prefix}.self_attention.linear_qkv", qkv_out, h, tp, split_out=True, bias=True)
    out.append(ParamEntry(f"{prefix}.pre_mlp_layernorm.weight", h, h, norm=True))
    out += _linear(f"{prefix}.mlp.linear_fc1", 2 * shape.intermediate_size, h, tp, split_out=True)
    out += _linear(f"{prefix}.mlp.linear_fc2", h, shape.intermediate_size, tp, split_out=False)
    return out


def vision_params(vision: VisionShape, tp: int, frozen: bool, prefix: str = "vision_model") -> list:
    """The vision tower as spark_megatron.models.vision builds it: a Conv3d patch embedding kept as one
    weight, megatron transformer layers with biases (TP-sharded like the language model; the MLP width padded
    with zero units to `vision_ffn_size`), and the 2x2 patch merger (RMSNorm + column/row-parallel MLP)."""
    hv, fv = vision.hidden_size, vision_ffn_size(vision.intermediate_size, tp)
    pad = fv - vision.intermediate_size
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    out = [ParamEntry(f"{prefix}.patch_embed_weight", patch * hv, patch * hv)]
    for i in range(vision.depth):
        p = f"{prefix}.decoder.layers.{i}"
        out.append(ParamEntry(f"{p}.input_layernorm.weight", hv, hv, norm=True))
        out += _linear(f"{p}.self_attention.linear_proj", hv, hv, tp, split_out=False, bias=True)
        out += _linear(f"{p}.self_attention.linear_qkv", 3 * hv, hv, tp, split_out=True, bias=True)
        out.append(ParamEntry(f"{p}.pre_mlp_layernorm.weight", hv, hv, norm=True))
        w1, b1 = _linear(f"{p}.mlp.linear_fc1", 2 * fv, hv, tp, split_out=True, bias=True)
        w2, b2 = _linear(f"{p}.mlp.linear_fc2", hv, fv, tp, split_out=False, bias=True)
        out += [replace(w1, padding=2 * pad * hv), replace(b1, padding=2 * pad), replace(w2, padding=hv * pad), b2]
    merged = hv * vision.spatial_merge_size ** 2
    out.append(ParamEntry(f"{prefix}.merger.ln_q.weight", hv, hv))  # a plain torch RMSNorm in params_dtype
    out += _linear(f"{prefix}.merger.fc1", merged, merged, tp, split_out=True, bias=True)
    out += _linear(f"{prefix}.merger.fc2", vision.out_hidden_size, merged, tp, split_out=False, bias=True)
    if frozen:
        out = [replace(e, frozen=True, shared_embedding=False) for e in out]
    return out


def rank_params(arch: ModelArchitecture, tp: int, pp: int, pp_rank: int, divisible_by: int = 128,
                freeze_vision: bool = False) -> list:
    """Every parameter on a rank at (tp, pp, pp_rank), in Megatron's registration order."""
    shape = arch.text
    first, last = pp_rank == 0, pp_rank == pp - 1
    vocab = padded_vocab_size(shape.vocab_size, divisible_by, tp)
    h = shape.hidden_size
    tied = shape.tie_word_embeddings
    lm = "language_model." if arch.vision else ""
    out = []
    if arch.vision is not None and first:
        out += vision_params(arch.vision, tp, freeze_vision)
    vocab_pad = (vocab - shape.vocab_size) * h
    if first:
        out.append(ParamEntry(f"{lm}embedding.word_embeddings.weight", vocab // tp * h, vocab * h,
                              shared_embedding=tied and not last, padding=vocab_pad))
    for local_i, _ in enumerate(stage_layers(shape.num_layers, pp, pp_rank)):
        out += decoder_layer_params(shape, tp, f"{lm}decoder.layers.{local_i}")
    if last:
        out.append(ParamEntry(f"{lm}decoder.final_layernorm.weight", h, h, norm=True))
        if not tied or not first:
            out.append(ParamEntry(f"{lm}output_layer.weight", vocab // tp * h, vocab * h, linear=True,
                                  shared_embedding=tied, padding=vocab_pad))
    return out


def total_params(arch: ModelArchitecture, include_padding: bool = False, divisible_by: int = 128) -> int:
    """Parameters of the whole model as HF counts them (without Megatron's zero padding of the vocab and the
    vision MLP, tied embedding counted once); `include_padding` counts what Megatron allocates at TP 1."""
    entries = rank_params(arch, 1, 1, 0, divisible_by)
    return sum(e.full_numel - (0 if include_padding else e.padding) for e in entries)
