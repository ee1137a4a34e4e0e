"""Where the rollout engines live in a job and what one weight push moves: the one layout function that the
trainer (`roles.build_roles`) and `spark-megatron plan` both use.

Colocated (the only placement built): every rank of the job hosts its part of a vLLM engine (external_launcher);
an engine spans `rollout.tensor_parallel_size` consecutive global ranks (a node's GPUs on a cluster), so there
are world / rollout TP engines, and each step's prompts are split across them (`split_prompts`). vLLM's TP rank
of a global rank is rank % rollout TP, Megatron's TP rank is rank % actor TP: where both TPs are equal, a rank's
engine shard of a TP-split weight is exactly the actor shard the same rank holds.

Weight push (sync/actor.py, delivery "colocated"), per HF tensor of the stage that owns it:
- "block" tensors (actor TP == rollout TP, the engine reads block `tp_rank` of the tensor along the dim Megatron
  splits it on, or the tensor whole where Megatron replicates it): ranks of the owning stage load what they hold,
  no byte moves; a rank of another stage receives only its block, point to point from the owning stage's rank of
  the same TP rank.
- every other tensor: the owning stage's TP ranks assemble it on their leader, which broadcasts it to every rank.
Memory per rank during a push: one bucket (its engine loads from it) plus at most the largest tensor (staging).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


class LayoutError(ValueError):
    """A rollout layout that cannot be built; the message is one line naming the settings."""


@dataclass(frozen=True)
class RolloutLayout:
    """The engines of a job and how weights reach them."""

    world: int
    actor_tp: int
    actor_pp: int
    actor_dp: int
    rollout_tp: int
    engines: int
    engine_ranks: tuple
    """Per engine, its global ranks (consecutive)."""
    sleeps: bool
    """Engines sleep while the actor trains (colocated on GPUs, level `sleep_level`); False on CPU, where vLLM
    has no sleep mode and the trainer's sleep/wake calls are only recorded."""
    sleep_level: int
    blocks: bool
    """Actor TP == rollout TP: TP-split weights reach the engines as per-rank blocks (see the module doc)."""

    @property
    def ranks_per_engine(self) -> int:
        return self.rollout_tp

    def engine_of(self, rank: int) -> int:
        return rank // self.rollout_tp

    def engine_leader(self, engine: int) -> int:
        """The global rank that reports an engine's results (its vLLM TP rank 0)."""
        return self.engine_ranks[engine][0]

    def label(self, engine: int) -> str:
        """'rollout engine 1 (ranks 2-3)': how logs and errors name an engine."""
        ranks = self.engine_ranks[engine]
        where = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        return f"rollout engine {engine} ({where})"

    def describe(self) -> str:
        """One line for `plan`, the recipes and logs."""
        groups = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in self.engine_ranks[:4])
        more = ", ..." if self.engines > 4 else ""
        sleep = f"sleep level {self.sleep_level} while the actor trains" if self.sleeps else \
            "no sleep (CPU: sleep/wake recorded only)"
        push = "TP-split weights as per-rank blocks" if self.blocks else "full HF tensors to every rank"
        return (f"{self.engines} engine(s) x TP {self.rollout_tp}, colocated on ranks [{groups}{more}]; {sleep}; "
                f"push: {push}")


def rollout_layout(world: int, actor_tp: int, actor_pp: int, rollout_tp: int, colocate: bool = True,
                   sleep_level: int = 1, on_gpu: bool = True, engine: str = "vllm",
                   gpus_per_node: Optional[int] = None) -> RolloutLayout:
    """The rollout layout of a job of `world` ranks; raises LayoutError (one line) when it cannot be built."""
    if not colocate:
        raise LayoutError("rollout.colocate=false (dedicated rollout GPUs, launch.rollout_gpus) is not built: "
                          "engines run colocated on every rank; set rollout.colocate=true and launch.rollout_gpus=0")
    if min(world, actor_tp, actor_pp, rollout_tp) < 1:
        raise LayoutError(f"world {world}, actor TP {actor_tp}, PP {actor_pp} and rollout TP {rollout_tp} must "
                          "all be >= 1")
    if world % (actor_tp * actor_pp):
        raise LayoutError(f"world size {world} is not a multiple of actor TP {actor_tp} x PP {actor_pp}")
    if world % rollout_tp:
        raise LayoutError(f"rollout.tensor_parallel_size {rollout_tp} does not divide the {world} ranks of the job")
    if gpus_per_node is not None and rollout_tp > gpus_per_node:
        raise LayoutError(f"rollout.tensor_parallel_size {rollout_tp} spans nodes (gpus_per_node {gpus_per_node});"
                          " a vLLM engine must fit on one node")
    if engine not in ("vllm", "hf"):
        raise LayoutError(f"rollout.engine must be 'vllm' or 'hf', got '{engine}'")
    if engine == "hf" and rollout_tp != 1:
        raise LayoutError("rollout.engine=hf runs one full model per rank: rollout.tensor_parallel_size must be 1")
    if sleep_level not in (1, 2):
        raise LayoutError(f"rollout.sleep_level must be 1 or 2, got {sleep_level}")
    engines = world // rollout_tp
    ranks = tuple(tuple(range(e * rollout_tp, (e + 1) * rollout_tp)) for e in range(engines))
    return RolloutLayout(world=world, actor_tp=actor_tp, actor_pp=actor_pp,
                         actor_dp=world // (actor_tp * actor_pp), rollout_tp=rollout_tp, engines=engines,
                         engine_ranks=ranks, sleeps=on_gpu and engine == "vllm", sleep_level=sleep_level,
                         blocks=actor_tp == rollout_tp)


def layout_for_config(cfg, world: int, on_gpu: bool) -> RolloutLayout:
    """RunConfig -> the layout of a job of `world` ranks."""
    par, ro = cfg.parallel, cfg.rollout
    return rollout_layout(world, par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                          ro.tensor_parallel_size, ro.colocate, ro.sleep_level, on_gpu, ro.engine)


# ------------------------------------------------------------------------------------------ prompts

def split_prompts(n: int, engines: int) -> list:
    """Balanced, deterministic split of n prompts over engines: contiguous [start, stop) per engine, the first
    n % engines engines one prompt more. Concatenating the engines' results in engine order restores the
    prompt order."""
    base, extra = divmod(n, engines)
    out, start = [], 0
    for e in range(engines):
        stop = start + base + (1 if e < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def gather_in_order(per_engine: Sequence[list], n: int) -> list:
    """The engines' result lists (engine order) -> one list in prompt order; checks every prompt came back once."""
    shares = split_prompts(n, len(per_engine))
    out = []
    for e, ((start, stop), got) in enumerate(zip(shares, per_engine)):
        if got is None or len(got) != stop - start:
            raise RuntimeError(f"rollout engine {e} returned {None if got is None else len(got)} results for its "
                               f"{stop - start} prompts")
        out.extend(got)
    return out


# ------------------------------------------------------------------------------------------ push volume

@dataclass(frozen=True)
class PushTensor:
    """One HF tensor of a push, as the volume accounting sees it."""

    nbytes: int
    stage: int
    """Pipeline stage that owns it."""
    block: bool
    """Travels as per-rank blocks (see the module doc); else assembled on the stage leader and broadcast."""
    split: bool = True
    """TP-split in the actor (False: every TP rank holds it whole)."""


@dataclass(frozen=True)
class PushVolume:
    model_bytes: int
    """Bytes of every HF tensor once (the model in the engines' dtype)."""
    received_bytes: tuple
    """Per global rank, bytes it receives in one push (TP assembly, broadcasts, blocks)."""

    @property
    def max_received_bytes(self) -> int:
        return max(self.received_bytes) if self.received_bytes else 0


def push_volume(layout: RolloutLayout, tensors: Sequence[PushTensor]) -> PushVolume:
    """Bytes each rank receives in one colocated push, by the rules of the module doc (Megatron rank order: TP
    fastest, then DP, then PP). Assembly counts (TP - 1) / TP of a split tensor on the leader (Megatron's vocab
    padding makes the real share of a vocab tensor slightly uneven)."""
    tp, pp, dp = layout.actor_tp, layout.actor_pp, layout.actor_dp
    got = [0] * layout.world
    for t in tensors:
        leader = t.stage * tp * dp  # TP rank 0, DP rank 0 of the owning stage
        for rank in range(layout.world):
            in_stage = rank // (tp * dp) == t.stage
            if t.block:
                if not in_stage:
                    got[rank] += t.nbytes // tp if t.split else t.nbytes
            elif rank == leader:
                got[rank] += t.nbytes - t.nbytes // tp if t.split else 0
            else:
                got[rank] += t.nbytes
    return PushVolume(sum(t.nbytes for t in tensors), tuple(got))
