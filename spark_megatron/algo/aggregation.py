"""Reduce a per-token loss matrix to the scalar a micro-batch backpropagates.

The denominators are GLOBAL (tokens or sequences of the whole optimizer batch, over all micro-batches and
data-parallel ranks), so summing the micro-batch losses gives exactly the full-batch loss and gradient, however
the batch is split. When the data-parallel all-reduce averages gradients over R ranks, pass the global count
divided by R.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from spark_megatron.algo.registry import Registry

LOSS_AGGREGATIONS = Registry("loss aggregation")

Count = Union[int, float, torch.Tensor, None]


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values where mask, else 0: a select, not a product, so inf or NaN at a masked position cannot leak into
    the sum (inf * 0 = NaN) and its gradient there is exactly 0."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


@LOSS_AGGREGATIONS.register("token-mean")
def token_mean(values: torch.Tensor, mask: torch.Tensor, global_token_count: Count = None,
               global_seq_count: Count = None) -> torch.Tensor:
    """sum(values * mask) / global_token_count. values, mask [B, T] -> scalar. Local token count if None."""
    denom = mask.sum() if global_token_count is None else global_token_count
    return _masked(values, mask).sum() / denom


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor, global_token_count: Count = None,
                        global_seq_count: Count = None) -> torch.Tensor:
    """sum over sequences of (mean over that sequence's tokens) / global_seq_count. [B, T] -> scalar.

    A sequence with no response tokens contributes 0 but still counts in the denominator.
    """
    per_seq = _masked(values, mask).sum(-1) / mask.sum(-1).clamp(min=1).to(values.dtype)
    denom = values.shape[0] if global_seq_count is None else global_seq_count
    return per_seq.sum() / denom


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(values: torch.Tensor, mask: torch.Tensor, global_token_count: Count = None,
                       global_seq_count: Count = None) -> torch.Tensor:
    """sum(values * mask) / global_seq_count (token sums per sequence, averaged over sequences). [B, T] -> scalar."""
    denom = values.shape[0] if global_seq_count is None else global_seq_count
    return _masked(values, mask).sum() / denom


def aggregate_loss(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
                   global_token_count: Count = None, global_seq_count: Optional[Count] = None) -> torch.Tensor:
    """Aggregate per-token `values` [B, T] under `mask` [B, T] with the named mode -> scalar."""
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    return LOSS_AGGREGATIONS.get(mode)(values, mask, global_token_count, global_seq_count)
