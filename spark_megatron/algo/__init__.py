"""Pure tensor functions of the SPARK/GRPO update: advantages, PPO-clip, KL estimators, loss aggregation.

Registries: ADVANTAGE_ESTIMATORS, POLICY_LOSSES, KL_ESTIMATORS, LOSS_AGGREGATIONS (pick by name in recipes).
"""
from spark_megatron.algo.advantages import (ADVANTAGE_ESTIMATORS, compute_advantages, grpo_advantages,
                                            grpo_mean_only_advantages, token_advantages)
from spark_megatron.algo.aggregation import LOSS_AGGREGATIONS, aggregate_loss
from spark_megatron.algo.kl import KL_ESTIMATORS, kl_penalty
from spark_megatron.algo.loss import spark_grpo_loss
from spark_megatron.algo.policy_loss import POLICY_LOSSES, PolicyLossTerms, ppo_clip_loss, truncated_is_weights

__all__ = [
    "ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES", "PolicyLossTerms",
    "aggregate_loss", "compute_advantages", "grpo_advantages", "grpo_mean_only_advantages", "kl_penalty",
    "ppo_clip_loss", "spark_grpo_loss", "token_advantages", "truncated_is_weights",
]
