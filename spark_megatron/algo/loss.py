"""The SPARK / GRPO loss of one micro-batch: PPO-clip + beta * KL(policy || reference), globally normalised."""
from __future__ import annotations

from typing import Optional

import torch

from spark_megatron.algo.aggregation import Count, aggregate_loss
from spark_megatron.algo.advantages import token_advantages
from spark_megatron.algo.kl import kl_penalty
from spark_megatron.algo.policy_loss import ppo_clip_loss, truncated_is_weights


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Local diagnostic mean over response tokens (0 for an empty mask), detached."""
    m = mask.bool()
    picked = torch.where(m, values.detach(), torch.zeros((), dtype=values.dtype, device=values.device))
    return (picked.sum() / m.sum().clamp(min=1)).detach()


def spark_grpo_loss(logprobs: torch.Tensor, old_logprobs: Optional[torch.Tensor],
                    ref_logprobs: Optional[torch.Tensor], advantages: torch.Tensor, response_mask: torch.Tensor,
                    global_token_count: Count, cfg, rollout_logprobs: Optional[torch.Tensor] = None,
                    global_seq_count: Count = None) -> tuple:
    """Loss to backpropagate for one micro-batch, and its metrics.

    Shapes: logprobs [B, T] (current policy, with grad), old_logprobs [B, T] (policy that sampled, as the
    trainer recomputed it; None = on-policy, logprobs.detach()), ref_logprobs [B, T] (frozen initial model;
    None = no KL), advantages [B] or [B, T], response_mask [B, T] (1 on response tokens), rollout_logprobs [B, T]
    (the engine's, for truncated IS when cfg.tis_cap is set).

    loss = agg(w * ppo_clip + kl_coef * kl) where agg is cfg.loss_agg over the GLOBAL token (or sequence)
    count, so summing the returned losses of all micro-batches reproduces the full-batch loss and gradient.
    `cfg` is an `AlgorithmConfig`. Metrics are detached 0-d tensors (no device sync): pg_loss and kl_loss are
    this micro-batch's contributions to the loss; the rest are local means over its response tokens.
    """
    mask = response_mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = token_advantages(advantages.to(logprobs.dtype), mask)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    terms = ppo_clip_loss(logprobs, old_logprobs, advantages, cfg.clip_low, cfg.clip_high)
    pg_tok = terms.loss
    metrics = {}
    if cfg.tis_cap is not None and rollout_logprobs is not None:
        weights = truncated_is_weights(old_logprobs, rollout_logprobs, cfg.tis_cap)
        pg_tok = pg_tok * weights
        metrics["tis_weight_mean"] = _masked_mean(weights, mask)
    pg_loss = aggregate_loss(pg_tok, mask, cfg.loss_agg, global_token_count, global_seq_count)
    loss = pg_loss
    if ref_logprobs is not None and cfg.kl_coef != 0:
        kl_tok = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator)
        kl_loss = cfg.kl_coef * aggregate_loss(kl_tok, mask, cfg.loss_agg, global_token_count, global_seq_count)
        loss = loss + kl_loss
        metrics["kl_loss"] = kl_loss.detach()
        metrics["kl"] = _masked_mean(kl_tok, mask)
    clipped_low = terms.clipped_low.to(mask.dtype)
    clipped_high = terms.clipped_high.to(mask.dtype)
    metrics.update(
        pg_loss=pg_loss.detach(),
        clipfrac=_masked_mean(clipped_low + clipped_high, mask),
        clipfrac_low=_masked_mean(clipped_low, mask),
        clipfrac_high=_masked_mean(clipped_high, mask),
        ratio_mean=_masked_mean(terms.ratio, mask),
        ppo_kl=_masked_mean(old_logprobs - logprobs, mask),
        num_tokens=mask.sum().detach(),
    )
    return loss, metrics
