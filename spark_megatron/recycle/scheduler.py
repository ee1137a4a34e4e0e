"""When recycled tasks are trained: a separate reward-period update (alternate) or inside the policy batch (mixed).

Controller usage, per step:
    queue.start_epoch(epoch)
    batch = scheduler.policy_batch(prompts, queue)           # mixed: + queued recycled tasks
    groups = rollout_and_verify(batch.prompts); train(groups)
    queue.push(builder.build(groups, step).samples)          # recycled groups are skipped by the builder
    for reward in scheduler.reward_batches(queue):           # alternate: full queued batches
        train(rollout_and_verify(reward.prompts))
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from spark_megatron.recycle.queue import RecycleQueue
from spark_megatron.types import TaskKind

SCHEDULES = ("alternate", "mixed")


class Phase(str, enum.Enum):
    POLICY = "policy"
    REWARD = "reward"


@dataclass
class ScheduledBatch:
    phase: Phase
    prompts: list
    """Prompts to roll out and train on, in order: policy prompts first, then recycled ones (mixed)."""

    @property
    def num_recycled(self) -> int:
        return sum(1 for p in self.prompts if TaskKind(p.kind).recycled)


class RecycleScheduler:
    """Decides which batches a step trains. `cfg` is a RecycleConfig; `batch_size` = data.prompts_per_step."""

    def __init__(self, cfg, batch_size: int):
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"recycle.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
        self.cfg = cfg
        self.reward_batch_size = cfg.reward_batch_size or batch_size
        self.mixed_max = cfg.mixed_max_per_step or self.reward_batch_size

    @property
    def mixed(self) -> bool:
        return self.cfg.enabled and self.cfg.schedule == "mixed"

    def policy_batch(self, prompts: list, queue: RecycleQueue) -> ScheduledBatch:
        """The policy batch; in mixed mode followed by up to `mixed_max` queued recycled tasks (FIFO)."""
        extra = queue.pop(self.mixed_max) if self.mixed else []
        return ScheduledBatch(Phase.POLICY, list(prompts) + extra)

    def reward_batches(self, queue: RecycleQueue) -> list:
        """Alternate mode: full batches of queued tasks to train now, at most `max_reward_batches_per_step`.

        A partial batch waits in the queue for the next step (or is discarded at the epoch reset).
        """
        if not self.cfg.enabled or self.cfg.schedule != "alternate":
            return []
        out = []
        while len(out) < self.cfg.max_reward_batches_per_step:
            batch = queue.pop_batch(self.reward_batch_size)
            if batch is None:
                break
            out.append(ScheduledBatch(Phase.REWARD, batch))
        return out
