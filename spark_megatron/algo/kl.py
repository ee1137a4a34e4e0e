"""Per-token estimators of KL(policy || reference) from sampled-token logprobs."""
from __future__ import annotations

import torch

from spark_megatron.algo.registry import Registry

KL_ESTIMATORS = Registry("KL estimator")

_K3_MAX = 10.0
"""k3 grows like exp(ref - logp); a token the reference finds very unlikely must not dominate the batch."""


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log p - log p_ref. [B, T], [B, T] -> [B, T]; unbiased, high variance, can be negative."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """0.5 * (log p - log p_ref)^2. [B, T], [B, T] -> [B, T]; biased, low variance, >= 0."""
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_ESTIMATORS.register("k3", "low_var_kl")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """exp(d) - d - 1 with d = log p_ref - log p. [B, T], [B, T] -> [B, T]; unbiased, >= 0, capped at 10."""
    d = ref_logprobs - logprobs
    return (torch.exp(d) - d - 1.0).clamp(max=_K3_MAX)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL by estimator name. [B, T], [B, T] -> [B, T]."""
    return KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs)
