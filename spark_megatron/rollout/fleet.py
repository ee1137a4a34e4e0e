"""One rank's part of a job's colocated rollout engines (see rollout/layout.py for where they live).

Every rank of the job builds its part of one engine and calls every method with the same arguments (SPMD):
- `generate`: the prompts are split across the engines (`split_prompts`); each engine generates its share; the
  engines' leaders send their groups to rank 0, which returns all of them in prompt order (the controller's
  verifier and queue live there);
- `score`, `sleep`, `wake_weights`, `wake_kv`: this rank's engine part;
- `load_weights`: runs the roles' push of the actor's weights into this rank's engine part (`roles.py`:
  `sync.push_actor_weights`, delivery "colocated").
Each call runs under the engine watch (deadline, one-line failure) and is appended to `calls`, so the order of
sleep / wake / push / generate is visible (and tested) also on CPU, where vLLM has no sleep mode.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from spark_megatron.rollout.layout import RolloutLayout, gather_in_order, split_prompts
from spark_megatron.rollout.watch import EngineWatch


class EngineFleet:
    """This rank's engine part plus the layout of all engines."""

    def __init__(self, layout: RolloutLayout, engine, rank: int, timeout_s: float,
                 timeout_setting: str = "rollout.engine_timeout_s"):
        self.layout, self.engine, self.rank = layout, engine, rank
        self.index = layout.engine_of(rank)
        self.label = layout.label(self.index)
        self.watch = EngineWatch(self.label, timeout_s, rank, timeout_setting)
        self.calls: list = []
        """(operation, detail) in call order: ("generate", prompts of this engine), ("sleep", level),
        ("wake", tags), ("push", version)."""
        self.last_shares: Optional[list] = None
        """Rank 0, after `generate`: per engine, the uids of the prompts it generated (engine order)."""
        self.last_push = None
        """PushStats of this rank's last push."""

    @property
    def is_engine_leader(self) -> bool:
        return self.rank == self.layout.engine_leader(self.index)

    # ------------------------------------------------------------------------------------------ serving
    def generate(self, prompts: Sequence, sampling) -> Optional[list]:
        """All ranks call with the same prompts -> on rank 0 every RolloutGroup in prompt order, else None."""
        import torch.distributed as dist

        start, stop = split_prompts(len(prompts), self.layout.engines)[self.index]
        self.calls.append(("generate", stop - start))
        with self.watch("generate"):
            mine = self.engine.generate(list(prompts[start:stop]), sampling)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            per_engine = [mine]
        else:
            everyone = [None] * dist.get_world_size() if self.rank == 0 else None
            dist.gather_object(mine if self.is_engine_leader else None, everyone, dst=0)
            if self.rank != 0:
                return None
            per_engine = [everyone[self.layout.engine_leader(e)] for e in range(self.layout.engines)]
        self.last_shares = [[g.prompt.uid for g in got] if got is not None else None for got in per_engine]
        return gather_in_order(per_engine, len(prompts))

    def score(self, sequences: Sequence) -> list:
        """This rank's engine's logprobs of fixed sequences (every rank calls: engines step together)."""
        with self.watch("score"):
            return self.engine.score(sequences)

    # ------------------------------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """While the actor trains: release the engine's GPU memory (level from the layout)."""
        self.calls.append(("sleep", self.layout.sleep_level))
        with self.watch("sleep"):
            self.engine.sleep(self.layout.sleep_level)

    def wake_weights(self) -> None:
        """Before a push: weights back, KV cache still released."""
        self.calls.append(("wake", "weights"))
        with self.watch("wake_up"):
            self.engine.wake_up(["weights"])

    def wake_kv(self) -> None:
        """After a push: KV cache back; the engine serves again."""
        self.calls.append(("wake", "kv_cache"))
        with self.watch("wake_up"):
            self.engine.wake_up(["kv_cache"])

    # ------------------------------------------------------------------------------------------ weights
    def shard_reads(self) -> Optional[Callable]:
        """hf_name -> what of the full tensor this rank's engine part reads (see sync.blocks): whole tensors at
        rollout TP 1, the engine's own rule (`shard_reads`) above; None where the engine has no rule."""
        if self.layout.rollout_tp == 1:
            return lambda name: "whole"
        return getattr(self.engine, "shard_reads", None)

    def load_weights(self, version: int, push: Callable, passthrough: tuple = ()):
        """Run `push()` (every rank streams the actor's shards into its engine part; see roles.py) under the
        watch; exceptions in `passthrough` (a rejected or failed push) keep their type. -> push's result."""
        self.calls.append(("push", version))
        with self.watch("push", passthrough=passthrough):
            self.last_push = push()
        return self.last_push

    def shutdown(self) -> None:
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()
