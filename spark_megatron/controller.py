"""The SPARK step, top to bottom:

prompts -> rollout (vLLM) -> verify -> advantages -> [recycle -> queue] -> logprobs (actor, reference)
-> loss -> optimizer step -> [reward period: recycled tasks through the same pipeline] -> push weights -> log

Every rank runs this SPMD. The driver (global rank 0) owns the rollout engine, the verifier and the recycle
queue; what they produce is broadcast so all ranks build identical training sequences.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch.distributed as dist

from spark_megatron.config import RunConfig
from spark_megatron.recycle import RecycleBuilder, RecycleQueue, RecycleScheduler
from spark_megatron.run_state import RunState
from spark_megatron.sequences import SequenceBuilder, group_metrics
from spark_megatron.types import RolloutGroup


class StageTimer:
    """Wall time per named stage of one step (summed when a stage runs more than once)."""

    def __init__(self):
        self.seconds: dict = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict:
        return {f"time/{k}_s": v for k, v in self.seconds.items()}


def broadcast(obj, src: int = 0):
    """Send a picklable object from `src` to every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class SparkTrainer:
    """Owns the roles (actor, reference, rollout engine, verifier, recycler) and runs SPARK steps."""

    def __init__(self, cfg: RunConfig, hf_dir: str):
        from spark_megatron.roles import build_roles

        self.cfg, self.hf_dir = cfg, hf_dir
        self.is_driver = dist.get_rank() == 0
        self.roles = build_roles(cfg, hf_dir, self.is_driver)
        rc = cfg.algorithm.recycle
        self.recycler = RecycleBuilder(rc, seed=cfg.seed)
        self.queue = RecycleQueue(max_size=rc.queue_max_size)
        self.scheduler = RecycleScheduler(rc, cfg.data.prompts_per_step)
        self.sequences = SequenceBuilder(self.roles.tokenizer, cfg.algorithm, cfg.rollout)
        self.state = RunState(cfg, self.roles, self.queue, self.is_driver)

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, step: int, prompts: list) -> dict:
        timer, metrics = StageTimer(), {}
        batch = self.scheduler.policy_batch(prompts, self.queue)
        groups = self.rollout_and_verify(batch.prompts, timer)
        metrics.update(group_metrics(groups, prefix=""))
        metrics.update(self.update(groups, timer, phase="policy"))
        if self.cfg.algorithm.recycle.enabled:
            recycled = self.recycle(groups, step)
            metrics.update(recycled)
            for reward in self.scheduler.reward_batches(self.queue):  # alternate mode: reward period
                r_groups = self.rollout_and_verify(reward.prompts, timer)
                metrics.update(group_metrics(r_groups, prefix=""))
                metrics.update(self.update(r_groups, timer, phase="reward"))
        with timer("sync"):
            self.roles.push_weights()
        metrics.update(timer.metrics())
        metrics["time/step_s"] = sum(timer.seconds.values())
        metrics["policy_version"] = self.roles.policy_version
        return metrics

    def rollout_and_verify(self, prompts: list, timer: StageTimer) -> list:
        groups = None
        if self.is_driver:
            with timer("rollout"):
                groups = self.roles.engine.generate(prompts, self.roles.sampling)
            with timer("verify"):
                self._verify(groups)
        return broadcast(groups)

    def _verify(self, groups: list) -> None:
        from spark_megatron.verify.verifier import VerifyRequest

        flat = [(g, r) for g in groups for r in g.rollouts]
        verdicts = self.roles.verifier.verify_batch(
            [VerifyRequest(r.response_text, g.prompt.ground_truth, g.prompt.kind) for g, r in flat])
        for (_, r), v in zip(flat, verdicts):
            r.verdict = v

    def update(self, groups: list, timer: StageTimer, phase: str) -> dict:
        """Advantages -> old/ref logprobs -> optimizer steps over mini-batches (one pass, as in the paper)."""
        seqs = self.sequences.build(groups)
        with timer("logprobs"):
            self.roles.fill_logprobs(seqs)
        with timer("train"):
            out = self.roles.actor.train_step(seqs, self.roles.loss_fn, with_entropy=True)
        return {f"{phase}/{k}": v for k, v in out.items()}

    def recycle(self, groups: list, step: int) -> dict:
        if self.is_driver:
            result = self.recycler.build([g for g in groups if not g.prompt.kind.recycled], step)
            self.queue.push(result.samples)
            stats = {**result.stats.as_metrics(), **self.queue.metrics()}
        else:
            stats = None
        stats = broadcast(stats)
        self.queue.load_state_dict(broadcast(self.queue.state_dict() if self.is_driver else None))
        return stats

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        last = {}
        self.state.maybe_resume()
        self.state.maybe_warmup(self.sequences)
        self.roles.push_weights()
        for step, batch in self.state.batches():
            self.queue.start_epoch(batch.epoch)
            row = self.train_step(step, batch.prompts)
            row["epoch"] = batch.epoch
            last = self.state.logger.log(step, row)
            self.state.progress(step, last)
            self.state.maybe_checkpoint(step)
        self.state.finish()
        return last

    def close(self) -> None:
        self.roles.close()
        self.state.close()


__all__ = ["SparkTrainer", "StageTimer", "RolloutGroup"]
