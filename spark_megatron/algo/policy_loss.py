"""PPO-clip surrogate with separate lower and upper clip ranges, and truncated importance sampling."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MAX_LOG_RATIO = 20.0
"""exp() of a log-ratio beyond this overflows in bf16/fp16 and means the sample is far off-policy anyway."""


@dataclass
class PolicyLossTerms:
    """Per-token outputs of a policy loss; all [B, T]."""

    loss: torch.Tensor
    """Per-token surrogate loss (to be masked and aggregated)."""
    ratio: torch.Tensor
    """pi / pi_old per token."""
    clipped_low: torch.Tensor
    """bool: A < 0 and ratio < 1 - clip_low (the clip removes the gradient)."""
    clipped_high: torch.Tensor
    """bool: A > 0 and ratio > 1 + clip_high."""


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  clip_low: float = 0.2, clip_high: float = 0.2) -> PolicyLossTerms:
    """max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)) per token.

    logprobs [B, T] (with grad), old_logprobs [B, T], advantages [B, T] -> PolicyLossTerms of [B, T].
    """
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        clipped_low = (advantages < 0) & (ratio < 1.0 - clip_low)
        clipped_high = (advantages > 0) & (ratio > 1.0 + clip_high)
    return PolicyLossTerms(loss=loss, ratio=ratio, clipped_low=clipped_low, clipped_high=clipped_high)


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """min(pi_old_train / pi_rollout, cap) per token, no gradient. [B, T], [B, T] -> [B, T].

    The rollout engine (bf16 / fp8 kernels) and the trainer compute slightly different probabilities for the
    same weights; weighting the surrogate by this ratio corrects the bias, and the cap bounds its variance.
    """
    log_w = (old_logprobs - rollout_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_w).clamp(max=cap).detach()
