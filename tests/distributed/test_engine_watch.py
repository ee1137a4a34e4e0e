"""Engines under watch: an engine that dies or hangs ends the work with one line naming the engine and what it was
doing, quickly, never with a BrokenPipeError traceback or an endless wait.

Colocated engines live inside their ranks: killing the engine kills the rank, and the rank spawner names it from
the status the rank recorded; a hung engine call is ended by the rank's watch at rollout.engine_timeout_s. The
engine-process proxy (RemoteEngine) watches its process the same way. HF engines on the tiny Qwen2 keep it fast.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from spark_megatron.parallel.spawn import RankFailure, run_on_ranks
from tests.helpers import tiny_hf_checkpoint

pytestmark = pytest.mark.distributed
TIMEOUT_S = 3


def _prompts(n):
    from spark_megatron.types import Prompt

    return [Prompt(uid=f"p{i}", messages=[{"role": "user", "content": f"What is {i} + 1?"}], ground_truth=str(i + 1))
            for i in range(n)]


def fleet_worker(rank, world, hf_dir, fault):
    """World of HF engines (one per rank); rank 1's engine dies ('kill') or hangs ('hang') inside generate."""
    import torch.distributed as dist

    from spark_megatron.config import RolloutConfig
    from spark_megatron.rollout.engine import SamplingSpec
    from spark_megatron.rollout.fleet import EngineFleet
    from spark_megatron.rollout.hf_engine import HFEngine
    from spark_megatron.rollout.layout import rollout_layout

    dist.init_process_group("gloo", rank=rank, world_size=world)
    engine = HFEngine(hf_dir, RolloutConfig(max_prompt_tokens=64), seed=rank)
    fleet = EngineFleet(rollout_layout(world, 1, 1, 1, on_gpu=False, engine="hf"), engine, rank, TIMEOUT_S)
    if rank == 1:
        def broken(requests, params):
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)

        engine.generate = broken
    return fleet.generate(_prompts(4), SamplingSpec(n=1, max_tokens=2))


@pytest.mark.parametrize("fault,line", [
    ("kill", "rank 1 died (killed by SIGKILL) during generate in rollout engine 1 (rank 1)"),
    ("hang", f"rollout engine 1 (rank 1) hung: generate did not finish within {TIMEOUT_S} s "
             "(rollout.engine_timeout_s)"),
])
def test_colocated_engine_death_or_hang_ends_the_job_in_one_line(fault, line):
    hf_dir = str(tiny_hf_checkpoint("untied"))
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as e:
        run_on_ranks(fleet_worker, 2, hf_dir, fault, timeout_s=300)
    assert e.value.summary == line
    assert time.monotonic() - t0 < 120  # not the 600 s of the hang, nor a gloo timeout


def test_engine_process_death_and_hang_are_one_line_errors():
    from spark_megatron.config import RolloutConfig
    from spark_megatron.rollout.engine import SamplingSpec
    from spark_megatron.sync.remote import RemoteEngine
    from spark_megatron.rollout.watch import EngineFailure

    hf_dir = str(tiny_hf_checkpoint("untied"))
    cfg = RolloutConfig(engine="hf", max_prompt_tokens=64, max_response_tokens=4, engine_timeout_s=TIMEOUT_S)
    remote = RemoteEngine(cfg, hf_dir, dtype="float32")
    assert len(remote.generate(_prompts(1), SamplingSpec(n=1, max_tokens=2))) == 1
    pid = remote._proc.pid
    os.kill(pid, signal.SIGSTOP)  # alive but not answering
    t0 = time.monotonic()
    with pytest.raises(EngineFailure) as e:
        remote.score([[1, 2, 3]])
    assert str(e.value) == (f"rollout engine process {pid} hung: score did not finish within {TIMEOUT_S} s "
                            "(rollout.engine_timeout_s); killed it")
    assert TIMEOUT_S <= time.monotonic() - t0 < TIMEOUT_S + 10
    with pytest.raises(EngineFailure) as e:  # the next call finds it dead (killed above)
        remote.generate(_prompts(1), SamplingSpec(n=1, max_tokens=2))
    assert str(e.value) == f"rollout engine process {pid} died during generate (killed by signal 9)"
    remote.shutdown()  # nothing left to close: no BrokenPipeError
