"""Per-token logprobs and entropy from vocab-parallel logits, without gathering the vocabulary across TP.

Each TP rank holds logits for its slice of the (padded) vocabulary, shape [..., V / tp]. The label's logprob
comes from megatron's `vocab_parallel_cross_entropy` (max / sum-exp / picked-logit all-reduces); the entropy
uses the same two reductions. Columns past the true vocabulary (Megatron pads it to a multiple of 128) are set
to the most negative float first, so probabilities match an unpadded HF model exactly (they would otherwise get
exp(0) mass each). Both functions are differentiable; the reductions follow megatron's convention (all-reduce
forward, identity backward), so every TP rank of a stage computes the same scalar loss.
"""
from __future__ import annotations

from typing import Optional

import torch


def _tp():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group())


def mask_padded_vocab_(logits: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """In place: logits of padded vocabulary columns on this TP rank -> finfo.min (zero probability).

    finfo.min rather than -inf keeps 0 * logit finite in the entropy. Returns `logits`.
    """
    if vocab_size is None:
        return logits
    rank, _, _ = _tp()
    local = logits.shape[-1]
    valid = min(max(vocab_size - rank * local, 0), local)
    if valid < local:
        logits[..., valid:] = torch.finfo(logits.dtype).min
    return logits


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the full vocabulary; logits [..., V/tp] (fp32) -> [...].

    H = log S - sum(e * z) / S with z = logits - max, e = exp(z), S = sum(e), sums all-reduced over TP.
    """
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    _, tp_size, group = _tp()
    with torch.no_grad():
        m = logits.max(dim=-1).values
        if tp_size > 1:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    z = logits - m.unsqueeze(-1)
    e = torch.exp(z)
    sum_e = e.sum(dim=-1)
    sum_ez = (e * z).sum(dim=-1)
    if tp_size > 1:
        sum_e = reduce_from_tensor_model_parallel_region(sum_e)
        sum_ez = reduce_from_tensor_model_parallel_region(sum_ez)
    return torch.log(sum_e) - sum_ez / sum_e


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: Optional[int] = None,
                            with_entropy: bool = False, temperature: float = 1.0) -> tuple:
    """log softmax(logits / temperature)[label] and optionally the entropy, per position.

    logits [..., V/tp] (this TP rank's vocab slice, any float dtype), labels [...] int64 global ids (< vocab).
    Returns (logprobs [...] fp32, entropy [...] fp32 or None). `vocab_size` = true vocabulary (padded columns
    are masked); None = no padding. May overwrite non-leaf fp32 `logits` in place (megatron's cross entropy
    does, to save a logits-sized buffer): callers must not reuse them.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    if x is logits and x.is_leaf and x.requires_grad:
        x = x.clone()  # in-place writes below are not allowed on a leaf that requires grad
    mask_padded_vocab_(x, vocab_size)
    entropy = vocab_parallel_entropy(x) if with_entropy else None
    if entropy is not None and torch.is_grad_enabled() and x.requires_grad:
        x_ce = x.clone()  # the entropy graph saved x; the cross entropy below overwrites its input
    else:
        x_ce = x
    logprobs = -vocab_parallel_cross_entropy(x_ce, labels)
    return logprobs, entropy
