"""Per-token estimators of KL(policy || reference) from sampled-token logprobs.

Every estimator first clamps the log-ratio to +-_MAX_LOG_RATIO, before any exp or square: a position whose
logprob is extreme (a padded or masked token, a token the reference finds impossible) must give a finite value
and a zero, not NaN, gradient (an exp that overflows to inf turns the masked zero gradient into 0 * inf = NaN).
verl clamps the same way.
"""
from __future__ import annotations

import torch

from spark_megatron.algo.registry import Registry

KL_ESTIMATORS = Registry("KL estimator")

_MAX_LOG_RATIO = 20.0
"""Largest |log p - log p_ref| used; exp(20) is finite in every float type, and a token that far off is an outlier."""
_K3_MAX = 10.0
"""k3 grows like exp(ref - logp); a token the reference finds very unlikely must not dominate the batch."""


def _log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log p - log p_ref, clamped to +-_MAX_LOG_RATIO (NaN where either is NaN). [B, T], [B, T] -> [B, T]."""
    return (logprobs - ref_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log p - log p_ref (clamped). [B, T], [B, T] -> [B, T]; unbiased, high variance, can be negative."""
    return _log_ratio(logprobs, ref_logprobs)


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """0.5 * (log p - log p_ref)^2 (log-ratio clamped). [B, T], [B, T] -> [B, T]; biased, low variance, >= 0."""
    return 0.5 * _log_ratio(logprobs, ref_logprobs).square()


@KL_ESTIMATORS.register("k3", "low_var_kl")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """exp(d) - d - 1 with d = log p_ref - log p clamped before the exp. [B, T], [B, T] -> [B, T]; unbiased,
    >= 0, capped at 10."""
    d = -_log_ratio(logprobs, ref_logprobs)
    return (torch.exp(d) - d - 1.0).clamp(max=_K3_MAX)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL by estimator name. [B, T], [B, T] -> [B, T]."""
    return KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs)
