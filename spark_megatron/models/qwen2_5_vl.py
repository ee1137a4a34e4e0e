"""Megatron-core Qwen2.5-VL: vision tower on the first pipeline stage + mRoPE GPTModel, and its model family.

First stage: word embeddings -> image-pad positions replaced by the vision tower's merged features -> fed to the
GPTModel as `decoder_input`. Every stage gets the same 3-D (temporal, height, width) position ids, computed
from the token ids and image grids by `mrope_position_ids`, because every stage applies rotary embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from spark_megatron.models.qwen2 import (ModelSpecError, TextModelShape, check_parallel_layout, layer_spec,
                                         padded_vocab_size, transformer_config)
from spark_megatron.models.vision import VisionShape, VisionTransformer, vision_transformer_config

ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)


class VLInputError(ValueError):
    """Image placeholders and image inputs that do not agree (count, grid, size)."""


@dataclass
class VLModelShape:
    """Language model + vision tower + the special token ids that join them."""

    text: TextModelShape
    vision: VisionShape
    mrope_section: tuple
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int

    # the family interface reads these on any shape
    @property
    def num_layers(self) -> int:
        return self.text.num_layers

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "VLModelShape":
        arch = (cfg.get("architectures") or [cfg.get("model_type", "?")])[0]
        if arch not in ARCHITECTURES:
            raise ModelSpecError(f"{source}: unsupported architecture '{arch}' (supported: {ARCHITECTURES})")
        t = dict(cfg.get("text_config") or cfg)  # older configs keep text fields at the top level
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        heads = t["num_attention_heads"]
        head_dim = t["hidden_size"] // heads  # HF Qwen2.5-VL ignores any head_dim key
        section = tuple(rope.get("mrope_section") or ())
        if sum(section) != head_dim // 2:
            raise ModelSpecError(f"{source}: mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}")
        tied = bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
        text = TextModelShape(
            architecture=arch, vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"], num_layers=t["num_hidden_layers"], num_heads=heads,
            num_kv_heads=t.get("num_key_value_heads") or heads, head_dim=head_dim,
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1000000.0))),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6), max_position_embeddings=t.get("max_position_embeddings", 32768),
            tie_word_embeddings=tied)
        if "vision_config" not in cfg:
            raise ModelSpecError(f"{source}: no vision_config")
        vision = VisionShape.from_hf_dict(cfg["vision_config"], source)
        if vision.out_hidden_size != text.hidden_size:
            raise ModelSpecError(f"{source}: vision out_hidden_size {vision.out_hidden_size} != text hidden_size "
                                 f"{text.hidden_size}")
        return cls(text=text, vision=vision, mrope_section=section, image_token_id=cfg["image_token_id"],
                   video_token_id=cfg.get("video_token_id", -1),
                   vision_start_token_id=cfg.get("vision_start_token_id", -1))


def check_vl_layout(shape: VLModelShape, tp: int, pp: int, divisible_by: int = 128) -> None:
    """The text model's checks plus the vision tower's: TP must divide its heads and merger width. The vision
    MLP width is exempt: Megatron zero-pads it to a TP-divisible size (vision.vision_ffn_size), e.g. the 7B's
    3420 at TP 4 or 8."""
    check_parallel_layout(shape.text, tp, pp, divisible_by)
    v, problems = shape.vision, []
    for what, n in (("vision num_heads", v.num_heads),
                    ("vision merger width", v.hidden_size * v.spatial_merge_size ** 2)):
        if n % tp:
            problems.append(f"TP {tp} does not divide {what} {n}")
    if problems:
        raise ModelSpecError("; ".join(problems))


# ---------------------------------------------------------------------------------------------- positions
def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor], image_token_id: int,
                       merge: int) -> torch.Tensor:
    """[b, s] tokens (+ grids of the batch's images in order) -> [3, b, s] (temporal, height, width) positions.

    Text advances all three by 1 per token; an image of merged grid (t, h, w) occupies t*h*w tokens placed at
    (start + t_i, start + h_i, start + w_i), and the text after it resumes at start + max(h, w)
    (images have t == 1, so the temporal extent never dominates).
    """
    b, s = input_ids.shape
    out = torch.zeros(3, b, s, dtype=torch.long)
    grids = [tuple(int(x) for x in g) for g in (image_grid_thw.tolist() if image_grid_thw is not None else [])]
    gi = 0
    for row in range(b):
        ids = input_ids[row].tolist()
        pos, i, cur = [], 0, 0
        while i < s:
            if ids[i] != image_token_id:
                pos.append((cur, cur, cur))
                cur, i = cur + 1, i + 1
                continue
            if gi >= len(grids):
                raise VLInputError(f"sequence {row}: more <|image_pad|> runs than images ({len(grids)} given)")
            t, h, w = grids[gi][0], grids[gi][1] // merge, grids[gi][2] // merge
            n = t * h * w
            if ids[i:i + n] != [image_token_id] * n:
                raise VLInputError(f"sequence {row}: image {gi} needs {n} consecutive <|image_pad|> tokens at "
                                   f"position {i}, found {sum(1 for x in ids[i:i + n] if x == image_token_id)}")
            for ti in range(t):
                for hi in range(h):
                    for wi in range(w):
                        pos.append((cur + ti, cur + hi, cur + wi))
            cur, i, gi = cur + max(h, w), i + n, gi + 1
        out[:, row] = torch.tensor(pos, dtype=torch.long).T
    if gi != len(grids):
        raise VLInputError(f"{len(grids)} images given but the prompts hold placeholders for {gi}")
    return out


# ---------------------------------------------------------------------------------------------- model
class Qwen25VLModel(torch.nn.Module):
    """One pipeline stage of Qwen2.5-VL. `vision_model` exists on the first stage only."""

    def __init__(self, shape: VLModelShape, lm_config, vision_config, pre_process: bool, post_process: bool,
                 divisible_by: int = 128, vp_stage: Optional[int] = None, use_te: Optional[bool] = None):
        from megatron.core.models.gpt import GPTModel

        super().__init__()
        self.shape, self.pre_process, self.post_process = shape, pre_process, post_process
        from megatron.core.enums import ModelType

        self.config = lm_config  # megatron schedules read model.config / model.model_type
        self.model_type = ModelType.encoder_or_decoder
        self.vision_model = VisionTransformer(shape.vision, vision_config, use_te) if pre_process else None
        self.language_model = GPTModel(
            config=lm_config, transformer_layer_spec=layer_spec(use_te),
            vocab_size=padded_vocab_size(shape.vocab_size, divisible_by, lm_config.tensor_model_parallel_size),
            max_sequence_length=shape.text.max_position_embeddings, pre_process=pre_process,
            post_process=post_process, share_embeddings_and_output_weights=shape.tie_word_embeddings,
            position_embedding_type="mrope", rotary_base=int(shape.text.rope_theta), rotary_percent=1.0,
            parallel_output=True, vp_stage=vp_stage)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    # megatron's finalize_model_grads (PP > 1) reads these on the module that has `pre_process`, i.e. this one
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def embed(self, input_ids: torch.Tensor, image_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        """Word embeddings [s, b, h] with image-pad rows replaced by `image_embeds` [n, h] (batch-major order)."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        mask = input_ids == self.shape.image_token_id
        n_tok = int(mask.sum())
        n_feat = 0 if image_embeds is None else image_embeds.shape[0]
        if n_tok != n_feat:
            raise VLInputError(f"prompts hold {n_tok} <|image_pad|> tokens but the images give {n_feat} features")
        if n_tok == 0:
            return emb
        bsh = emb.transpose(0, 1).masked_scatter(mask.unsqueeze(-1), image_embeds.to(emb.dtype))
        return bsh.transpose(0, 1).contiguous()

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, pixel_values=None,
                image_grid_thw=None, image_embeds=None, image_embeds_fn=None, **kw):
        """position_ids: [3, b, s] mRoPE ids (see `mrope_position_ids`). On the first stage the image features
        come from `image_embeds` (precomputed/cached), else `image_embeds_fn(vision_model)`, else the tower
        run on `pixel_values` + `image_grid_thw`."""
        decoder_input = None
        if self.pre_process:
            if image_embeds is None and image_embeds_fn is not None:
                image_embeds = image_embeds_fn(self.vision_model)
            elif image_embeds is None and pixel_values is not None:
                image_embeds = self.vision_model(pixel_values, image_grid_thw)
            decoder_input = self.embed(input_ids, image_embeds)
        return self.language_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   decoder_input=decoder_input, labels=labels, **kw)

    def freeze_vision(self, frozen: bool = True) -> None:
        if self.vision_model is not None:
            self.vision_model.set_requires_grad(not frozen)


def model_provider(shape: VLModelShape, params_dtype: str = "float32", fp8: Optional[str] = None,
                   recompute: bool = False, divisible_by: int = 128, freeze_vision: bool = False,
                   init_weights: bool = True):
    """`provider(pre_process, post_process, vp_stage=None)` for the current parallel state. init_weights=False
    leaves every parameter (vision tower included) uninitialised, for stages that are loaded right after."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    check_vl_layout(shape, tp, pp, divisible_by)
    lm_config = transformer_config(shape.text, tp, pp, params_dtype, fp8, recompute, init_weights=init_weights)
    lm_config.mrope_section = list(shape.mrope_section)
    vision_config = vision_transformer_config(shape.vision, tp, params_dtype, fp8, init_weights=init_weights)

    def provider(pre_process=True, post_process=True, vp_stage=None):
        model = Qwen25VLModel(shape, lm_config, vision_config, pre_process, post_process, divisible_by, vp_stage)
        model.freeze_vision(freeze_vision)
        return model

    return provider


def build_stage(shape: VLModelShape, params_dtype: str = "float32", **kw):
    """This rank's pipeline stage (vision tower included on the first stage), on the compute device; built under
    `torch.device("meta")` it stays there (a skeleton whose layout conversion reads without any memory)."""
    from megatron.core import parallel_state as ps

    from spark_megatron.models.qwen2 import on_compute_device

    provider = model_provider(shape, params_dtype, **kw)
    return on_compute_device(provider(pre_process=ps.is_pipeline_first_stage(),
                                      post_process=ps.is_pipeline_last_stage()))
