"""An evaluation on several ranks: every rank hosts its part of a rollout engine, rank 0 runs the evaluation.

The engines are the training's colocated rollout engines (`rollout/layout.py`, `rollout/fleet.py`):
engine.tensor_parallel_size consecutive ranks per vLLM engine (external_launcher), engine.data_parallel_size
engines, and a generate call splits its prompts across them and returns them in order on rank 0. The engines
step together, so every rank must call generate with the same prompts at the same time. Rank 0 alone owns the
output directory, the data, the verifier, resume and the progress bar (the evaluation loop of `runner.py`,
unchanged); the other ranks only follow its commands, which rank 0 broadcasts over a gloo group:

    ("build", hf_dir, engine config, decoding)   every rank builds its engine part (after rank 0's export)
    ("generate", rendered prompts)               one batch (answers, judgments, or a self-reflection round)
    ("stop",)                                    report this rank's engine counts, shut the engine down

Because the prompts themselves travel (already rendered to token ids on rank 0), follow-up prompts built from
earlier responses (self-reflection) are identical on every rank by construction. Engine calls run under the
fleet's watch (a hung or failed engine ends the job with one line naming it).
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Optional, Sequence

from spark_megatron.eval.generation import (build_eval_fleet, engine_choice, eval_layout, merge, renderable,
                                           sampling_spec)

WAIT = timedelta(hours=24)
"""How long a follower waits for rank 0's next command: rank 0 may export a large checkpoint or verify a long
batch meanwhile. A dead rank 0 is noticed by the launcher (the rank spawner or torchrun), a hung engine by the
watch."""


class Control:
    """Rank 0 -> every rank commands, and every rank -> rank 0 reports, over a gloo group of the whole job."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = dist.new_group(backend="gloo", timeout=WAIT)

    def send(self, command: tuple) -> None:
        self.dist.broadcast_object_list([command], src=0, group=self.group)

    def receive(self) -> tuple:
        box = [None]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, report) -> Optional[list]:
        """Every rank's report, by rank, on rank 0 (None elsewhere)."""
        out = [None] * self.world if self.rank == 0 else None
        self.dist.gather_object(report, out, dst=0, group=self.group)
        return out


def init_job() -> Control:
    """Join the job's process group (env:// from the rank spawner or torchrun) -> its control channel. The
    default group is NCCL on GPUs (vLLM builds its device groups from its backend), gloo on CPU."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
    return Control()


def engine_report(fleet) -> dict:
    """What this rank's engine part generated (from the fleet's own call record)."""
    shares = [n for op, n in fleet.calls if op == "generate"]
    return {"engine": fleet.index, "label": fleet.label, "leader": fleet.is_engine_leader,
            "prompts": sum(shares), "calls": len(shares)}


class FleetGenerator:
    """Rank 0's Generator over the job's engines: `generator(hf_dir)` tells every rank to build its engine part,
    each call broadcasts one batch and generates it on all engines, `close()` stops the followers."""

    def __init__(self, control: Control):
        self.control = control
        self.fleet = None
        self.spec = None
        self.stopped = False
        self.broken = False
        """An engine call failed: the other ranks may be inside a collective, so no further command is sent
        (the launcher ends the job)."""
        self.reports: Optional[list] = None
        """After close(): per engine, its leader's engine_report (None if no engine was built)."""

    def generator(self, hf_dir: str, engine_cfg, decoding) -> "FleetGenerator":
        name, _ = engine_choice(engine_cfg, hf_dir)  # a model the engines cannot serve: refused before any build
        eval_layout(engine_cfg, self.control.world, name)
        self.control.send(("build", hf_dir, engine_cfg, decoding))
        self.fleet = self._guard(build_eval_fleet, engine_cfg, decoding, hf_dir, self.control.rank,
                                 self.control.world)
        self.spec = sampling_spec(decoding)
        return self

    def __call__(self, prompts: Sequence) -> list:
        ok, errors = renderable(self.fleet.engine, prompts)
        if not ok:  # nothing to serve: the followers are not involved
            return merge(errors, [])
        self.control.send(("generate", ok))
        return merge(errors, self._guard(self.fleet.generate, ok, self.spec))

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except BaseException:
            self.broken = True
            raise

    def close(self) -> None:
        """Stop the followers (idempotent); with engines built, collect their reports and shut them down."""
        if self.stopped or self.broken:
            return
        self.stopped = True
        self.control.send(("stop",))
        if self.fleet is None:
            return
        reports = self.control.gather(engine_report(self.fleet))
        self.reports = [r for r in reports if r["leader"]]
        self.fleet.shutdown()  # last: vLLM's shutdown destroys the job's process groups


def follow(control: Control) -> Optional[dict]:
    """A rank other than 0: build the engine part and generate when told, until stopped -> this rank's
    engine_report (None if rank 0 never needed the engines)."""
    command = control.receive()
    if command[0] == "stop":
        return None
    _, hf_dir, engine_cfg, decoding = command
    fleet = build_eval_fleet(engine_cfg, decoding, hf_dir, control.rank, control.world)
    spec = sampling_spec(decoding)
    while True:
        command = control.receive()
        if command[0] == "stop":
            break
        fleet.generate(command[1], spec)
    report = engine_report(fleet)
    control.gather(report)
    fleet.shutdown()
    return report


JOB_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
           "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun (and the rank spawner) tell a rank about its job; torchrun's TORCHELASTIC_* variables too."""


@contextlib.contextmanager
def outside_the_job():
    """Run the on-the-fly Megatron -> HF export as its own job: the converter would otherwise see this rank's
    RANK / WORLD_SIZE, take them for a torchrun job of its own and wait for the other ranks; and its rank 0
    would look for torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE) instead of hosting its own."""
    names = [k for k in os.environ if k in JOB_ENV or k.startswith("TORCHELASTIC_")]
    saved = {k: os.environ.pop(k) for k in names}
    try:
        yield
    finally:
        os.environ.update(saved)
