"""Pure tensor functions of the SPARK/GRPO update: advantages, PPO-clip, KL estimators, loss aggregation.

Registries, each picked by a config key: ADVANTAGE_ESTIMATORS (algorithm.adv_estimator), KL_ESTIMATORS
(algorithm.kl_estimator), LOSS_AGGREGATIONS (algorithm.loss_agg). The policy loss is PPO-clip (the only one SPARK uses).
"""
from spark_megatron.algo.advantages import (ADVANTAGE_ESTIMATORS, compute_advantages, grpo_advantages,
                                            grpo_mean_only_advantages, token_advantages)
from spark_megatron.algo.aggregation import LOSS_AGGREGATIONS, aggregate_loss
from spark_megatron.algo.kl import KL_ESTIMATORS, kl_penalty
from spark_megatron.algo.loss import spark_grpo_loss
from spark_megatron.algo.policy_loss import PolicyLossTerms, ppo_clip_loss, truncated_is_weights

__all__ = [
    "ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "PolicyLossTerms",
    "aggregate_loss", "compute_advantages", "grpo_advantages", "grpo_mean_only_advantages", "kl_penalty",
    "ppo_clip_loss", "spark_grpo_loss", "token_advantages", "truncated_is_weights",
]
