"""Group-normalised (GRPO) advantages and their broadcast to response tokens."""
from __future__ import annotations

import torch

from spark_megatron.algo.registry import Registry

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")


def _flat_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[G, n] bool: every reward of the group equals the first one (std is 0; no learning signal)."""
    return (rewards == rewards[..., :1]).all(dim=-1, keepdim=True).expand_as(rewards)


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-9, unbiased: bool = True) -> torch.Tensor:
    """A = (r - mean(r_group)) / (std(r_group) + eps).

    rewards: [num_groups, n] (one row per prompt, one column per rollout) -> advantages [num_groups, n], float.
    `unbiased` uses the n-1 std as the reference does. Groups whose rewards are all equal (including n = 1)
    get exactly 0: with eps = 1e-9 a rounding residue in r - mean would otherwise become a huge advantage.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, n], got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    mean = r.mean(dim=-1, keepdim=True)
    if r.shape[-1] > 1:
        std = r.std(dim=-1, keepdim=True, correction=1 if unbiased else 0)
    else:
        std = torch.zeros_like(mean)
    adv = (r - mean) / (std + eps)
    return torch.where(_flat_groups(r), torch.zeros_like(adv), adv)


@ADVANTAGE_ESTIMATORS.register("grpo_mean_only")
def grpo_mean_only_advantages(rewards: torch.Tensor, eps: float = 1e-9, unbiased: bool = True) -> torch.Tensor:
    """A = r - mean(r_group) (no std division, as in Dr. GRPO). rewards [G, n] -> [G, n]; eps/unbiased unused."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, n], got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    adv = r - r.mean(dim=-1, keepdim=True)
    return torch.where(_flat_groups(r), torch.zeros_like(adv), adv)


def compute_advantages(rewards: torch.Tensor, cfg) -> torch.Tensor:
    """[G, n] -> [G, n] with the estimator, eps and std flavour named in an `AlgorithmConfig`."""
    fn = ADVANTAGE_ESTIMATORS.get(cfg.adv_estimator)
    return fn(rewards, eps=cfg.adv_eps, unbiased=cfg.adv_std_unbiased)


def token_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Same advantage on every response token: advantages [B] x response_mask [B, T] -> [B, T] (0 on padding)."""
    if advantages.dim() != 1 or advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(f"advantages {tuple(advantages.shape)} do not match mask {tuple(response_mask.shape)}")
    return advantages[:, None] * response_mask.to(advantages.dtype)
