"""Megatron-core Qwen2.5-VL vision transformer (tensor-parallel; local spec on CPU, TE spec on GPU).

Blocks are megatron TransformerLayers (fused column-parallel QKV with bias, row-parallel proj, RMSNorm,
SwiGLU MLP with bias), so TP, TE kernels and FP8 apply as in the language model. Images are packed into one
sequence [s, 1, h]; attention stays inside one window (windowed blocks) or one image (full blocks, listed in
`fullatt_block_indexes`) through a block-diagonal mask (local spec) or packed-sequence cu_seqlens (TE).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from spark_megatron.models.mapping import padded_size
from spark_megatron.models.qwen2 import PARAMS_DTYPES, ModelSpecError, have_transformer_engine

# The vision MLP width is zero-padded where TP would not split it into shards of a multiple of 16 (HF -> Megatron
# pads, export and weight sync strip, see qwen2_5_vl_mapping): TE's FP8 GEMMs need dims divisible by 16 and bf16
# tensor cores prefer it. Qwen2.5-VL-3B and -7B have 3420 (855 per shard at TP 4, not even an integer at TP 8),
# the 32B and 72B 3456 (= 27 x 128: 432 per shard at TP 8, no padding). The padded width is also a multiple of
# 128 = 16 x 8, so TP 1, 2, 4 and 8 all pad alike (3420 -> 3456, 1 % more MLP) and a Megatron checkpoint's vision
# MLP has one shape that dist_checkpointing reshards across those TP sizes, as the TP-independent padded vocab.
FFN_SHARD_MULTIPLE = 16
FFN_MULTIPLE = 128


@dataclass
class VisionShape:
    """The HF `vision_config` facts the encoder needs."""

    hidden_size: int
    intermediate_size: int
    depth: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple
    out_hidden_size: int
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def ffn_size(self, tp: int) -> int:
        """The MLP width Megatron allocates at this TP (HF's intermediate_size zero-padded)."""
        return vision_ffn_size(self.intermediate_size, tp)

    @classmethod
    def from_hf_dict(cls, v: dict, source: str = "config.json") -> "VisionShape":
        if v.get("hidden_act", "silu") != "silu":
            raise ModelSpecError(f"{source}: vision_config.hidden_act '{v['hidden_act']}' unsupported (silu only)")
        try:
            return cls(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], depth=v["depth"],
                       num_heads=v["num_heads"], patch_size=v.get("patch_size", 14),
                       temporal_patch_size=v.get("temporal_patch_size", 2), in_channels=v.get("in_channels", 3),
                       spatial_merge_size=v.get("spatial_merge_size", 2), window_size=v.get("window_size", 112),
                       fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
                       out_hidden_size=v["out_hidden_size"],
                       rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
        except KeyError as e:
            raise ModelSpecError(f"{source}: vision_config lacks {e}") from None


def vision_ffn_size(intermediate_size: int, tp: int) -> int:
    """HF vision intermediate_size -> the zero-padded width every TP rank's MLP shard is cut from."""
    return padded_size(intermediate_size, tp, FFN_SHARD_MULTIPLE, FFN_MULTIPLE)


def ffn_padding_start(intermediate_size: int, tp: int, tp_rank: int) -> int:
    """Local index (within this rank's shard of the padded width) where the zero padding begins; = the shard
    width when the rank holds no padding. Padding sits at the end of the full width, so on the last rank(s)."""
    shard = vision_ffn_size(intermediate_size, tp) // tp
    return min(max(intermediate_size - tp_rank * shard, 0), shard)


def vision_transformer_config(v: VisionShape, tp: int, params_dtype: str = "float32", fp8: Optional[str] = None,
                              init_weights: bool = True):
    """init_weights=False: no random initialisation (the tower is loaded right after), as for the text model."""
    from megatron.core.transformer import TransformerConfig

    dtype = PARAMS_DTYPES[params_dtype]
    kw = dict(
        num_layers=v.depth, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_size(tp),
        num_attention_heads=v.num_heads, num_query_groups=v.num_heads, kv_channels=v.head_dim,
        normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=True, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,  # the whole tower lives on stage 0
        sequence_parallel=False, params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        pipeline_dtype=dtype, use_cpu_initialization=True, attention_softmax_in_fp32=True,
        perform_initialization=init_weights)
    if fp8:
        kw.update(fp8="hybrid" if fp8 == "delayed" else "e4m3")
    return TransformerConfig(**kw)


def vision_layer_spec(use_te: bool):
    """GPT layer spec with a bidirectional (padding-mask) attention instead of a causal one."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer.enums import AttnMaskType

    spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec() if use_te
                         else get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.params = dict(spec.submodules.self_attention.params or {},
                                                 attn_mask_type=AttnMaskType.padding)
    return spec


# ---------------------------------------------------------------------------------------------- index math
def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) patch coordinates [n, 2] in the processor's order: merge x merge blocks, row-major inside."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        pos = torch.stack([hh.transpose(1, 2).reshape(-1), ww.transpose(1, 2).reshape(-1)], dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


def window_order(grid_thw: torch.Tensor, v: VisionShape) -> tuple:
    """Order of merged tokens grouped by attention window, and the window lengths in patches.

    Windows tile each image's merged-token grid in squares of window_size / patch / merge tokens (edge windows
    are smaller); returns (merged-token permutation [m], window lengths list, image lengths list).
    """
    side = v.window_size // v.spatial_merge_size // v.patch_size
    unit = v.spatial_merge_size ** 2
    perm, win_lens, img_lens, base = [], [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // v.spatial_merge_size, w // v.spatial_merge_size
        ids = torch.arange(t * gh * gw).view(t, gh, gw)
        for ti in range(t):
            for r0 in range(0, gh, side):
                for c0 in range(0, gw, side):
                    block = ids[ti, r0:r0 + side, c0:c0 + side].reshape(-1)
                    perm.append(block + base)
                    win_lens.append(block.numel() * unit)
            img_lens.append(gh * gw * unit)  # full attention spans one frame (t==1 for images)
        base += t * gh * gw
    return torch.cat(perm), win_lens, img_lens


def block_mask(lengths: list, device) -> torch.Tensor:
    """[1, 1, s, s] bool mask, True where attention is NOT allowed (megatron's convention)."""
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))
    return (seg[:, None] != seg[None, :]).view(1, 1, seg.numel(), seg.numel())


def packed_params(lengths: list, device):
    """PackedSeqParams (THD) for TE attention over variable-length segments."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = F.pad(torch.tensor(lengths, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    mx = max(lengths)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=mx, max_seqlen_kv=mx)


# ---------------------------------------------------------------------------------------------- modules
class PatchMerger(torch.nn.Module):
    """RMSNorm, then a 2-layer GELU MLP over each 2x2 group of patches (column- then row-parallel)."""

    def __init__(self, v: VisionShape, config):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.width = v.hidden_size * v.spatial_merge_size ** 2
        self.ln_q = torch.nn.RMSNorm(v.hidden_size, eps=1e-6, dtype=config.params_dtype)
        init = torch.nn.init.xavier_uniform_
        self.fc1 = ColumnParallelLinear(self.width, self.width, config=config, init_method=init, bias=True,
                                        gather_output=False)
        self.fc2 = RowParallelLinear(self.width, v.out_hidden_size, config=config, init_method=init, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)

    def forward(self, x):
        h, _ = self.fc1(self.ln_q(x).view(-1, self.width))
        out, _ = self.fc2(F.gelu(h))
        return out


class VisionTransformer(torch.nn.Module):
    """pixel patches [n, C*T*P*P] + grid_thw [images, 3] -> merged image features [n / merge^2, out_hidden]."""

    def __init__(self, v: VisionShape, config, use_te: Optional[bool] = None):
        from megatron.core.transformer.transformer_block import TransformerBlock

        super().__init__()
        self.shape, self.config = v, config
        self.use_te = have_transformer_engine() if use_te is None else use_te
        # Conv3d with stride == kernel is a linear map of each flattened patch; kept in HF's 5-D shape
        self.patch_embed_weight = torch.nn.Parameter(torch.empty(
            v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size,
            dtype=config.params_dtype))
        if config.perform_initialization:  # else every parameter, padding included, is loaded right after
            torch.nn.init.normal_(self.patch_embed_weight, std=0.02)
        self.decoder = TransformerBlock(config=config, spec=vision_layer_spec(self.use_te),
                                        post_layer_norm=False, pre_process=True, post_process=False)
        self.merger = PatchMerger(v, config)
        if config.perform_initialization:
            self.zero_ffn_padding()
        half = v.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / (v.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float)
                                                                  / half)), persistent=False)

    def rotary(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """[n, 1, 1, head_dim] angles: h-frequencies then w-frequencies, repeated for the two rotate halves."""
        pos = patch_positions(grid_thw, self.shape.spatial_merge_size).to(self.inv_freq.device).float()
        f = torch.cat([pos[:, :1] * self.inv_freq, pos[:, 1:] * self.inv_freq], dim=-1)
        return torch.cat([f, f], dim=-1)[:, None, None, :]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        v = self.shape
        unit = v.spatial_merge_size ** 2
        grid_thw = grid_thw.cpu()
        x = F.linear(pixel_values.to(self.patch_embed_weight.dtype),
                     self.patch_embed_weight.view(v.hidden_size, -1))
        n = x.shape[0]
        perm, win_lens, img_lens = window_order(grid_thw, v)
        perm = perm.to(x.device)
        x = x.view(n // unit, unit, -1)[perm].reshape(n, 1, -1)  # [s, b=1, h]
        rope = self.rotary(grid_thw).view(n // unit, unit, 1, 1, -1)[perm].reshape(n, 1, 1, -1)
        if self.use_te:
            attn = {"window": dict(packed_seq_params=packed_params(win_lens, x.device), attention_mask=None),
                    "full": dict(packed_seq_params=packed_params(img_lens, x.device), attention_mask=None)}
        else:
            attn = {"window": dict(attention_mask=block_mask(win_lens, x.device)),
                    "full": dict(attention_mask=block_mask(img_lens, x.device))}
        for i, layer in enumerate(self.decoder.layers):
            kind = "full" if i in v.fullatt_block_indexes else "window"
            out = layer(hidden_states=x, rotary_pos_emb=rope, **attn[kind])
            x = out[0] if isinstance(out, tuple) else out
        merged = self.merger(x.view(n, -1))
        return merged[torch.argsort(perm)]

    @torch.no_grad()
    def zero_ffn_padding(self) -> None:
        """Zero this rank's padded MLP slots (random init touched them): gate/up rows + their biases, down columns.

        Why the padding then stays exact and zero for good: a padded unit has gate = up = 0, so it outputs
        silu(0) * 0 = 0 whatever the input, and its down column multiplies that 0. Its gradients are exactly 0
        too (for a finite upstream gradient g; a non-finite step is skipped by step_optimizer): d up =
        silu(0) * g = 0 and d gate = silu'(0) * up * g = 0, so the gate/up rows and biases get 0 * input = 0, and
        the down column gets g * 0 = 0. Adam's moments of a slot whose gradient is always 0 stay 0, its update
        m / (sqrt(v) + eps) is 0, decoupled weight decay lr * wd * 0 is 0 (coupled L2 would add wd * 0 to the
        gradient), gradient clipping scales 0 to 0 and bf16/fp8 casts keep 0 -- so the padded slots are exactly
        zero after every step (checked in tests/distributed/test_vl_padding.py).
        """
        from megatron.core import parallel_state as ps

        tp, v = self.config.tensor_model_parallel_size, self.shape
        shard = v.ffn_size(tp) // tp
        start = ffn_padding_start(v.intermediate_size, tp, ps.get_tensor_model_parallel_rank() if tp > 1 else 0)
        if start == shard:
            return
        for layer in self.decoder.layers:
            fc1, fc2 = layer.mlp.linear_fc1, layer.mlp.linear_fc2
            for t in (fc1.weight, fc1.bias):  # local rows are [gate shard; up shard]
                t.view((2, shard) + tuple(t.shape[1:]))[:, start:] = 0
            fc2.weight[:, start:] = 0

    def set_requires_grad(self, flag: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(flag)
