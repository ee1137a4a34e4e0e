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

from spark_megatron.models.qwen2 import ModelSpecError, _DTYPES, have_transformer_engine


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

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

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


def vision_transformer_config(v: VisionShape, tp: int, params_dtype: str = "float32", fp8: Optional[str] = None):
    from megatron.core.transformer import TransformerConfig

    dtype = _DTYPES[params_dtype]
    kw = dict(
        num_layers=v.depth, hidden_size=v.hidden_size, ffn_hidden_size=v.intermediate_size,
        num_attention_heads=v.num_heads, num_query_groups=v.num_heads, kv_channels=v.head_dim,
        normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=True, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,  # the whole tower lives on stage 0
        sequence_parallel=False, params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        pipeline_dtype=dtype, use_cpu_initialization=True, attention_softmax_in_fp32=True)
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
        torch.nn.init.normal_(self.patch_embed_weight, std=0.02)
        self.decoder = TransformerBlock(config=config, spec=vision_layer_spec(self.use_te),
                                        post_layer_norm=False, pre_process=True, post_process=False)
        self.merger = PatchMerger(v, config)
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

    def set_requires_grad(self, flag: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(flag)
