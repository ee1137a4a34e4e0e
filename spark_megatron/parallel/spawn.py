"""Run a function on N real ranks (spawned processes, gloo) and re-raise the first failure in the caller.

Used by the distributed tests and the benchmarks; `fn(rank, world_size, *args)` must be importable (top level).
Each rank's return value comes back to the caller, so checks can be asserted in the parent.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """A spawned rank raised; the message carries its traceback."""


class RankInterrupted(RankFailure):
    """A spawned rank got KeyboardInterrupt (SIGINT); the other ranks have been stopped."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue, env):
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        out = fn(rank, world, *args)
        queue.put((rank, True, out))
    except KeyboardInterrupt:
        queue.put((rank, "interrupted", traceback.format_exc()))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from spark_megatron.parallel.groups import destroy_distributed
            destroy_distributed()
        except Exception:  # noqa: BLE001
            pass


def run_on_ranks(fn, world_size: int, *args, timeout_s: float = 600, env: dict | None = None) -> list:
    """Spawn `world_size` processes running `fn(rank, world_size, *args)`; return their results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    base_env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    base_env.update(env or {})
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, base_env))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, failures, interrupted = {}, [], False
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout_s)
            if ok is True:
                results[rank] = payload
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                interrupted = ok == "interrupted"
                break
        if interrupted:
            stop(procs)
    except BaseException:  # an interrupt (or timeout) here: the ranks must not go on (and publish) without us
        stop(procs)
        raise
    finally:
        for p in procs:
            p.join(timeout=5 if failures else 60)
            if p.is_alive():
                p.kill()
    if failures:
        raise (RankInterrupted if interrupted else RankFailure)("\n".join(failures))
    return [results[r] for r in range(world_size)]


def stop(procs, grace_s: float = 3.0) -> None:
    """Terminate processes (SIGTERM, then SIGKILL after `grace_s`) and reap them."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=grace_s)
        if p.is_alive():
            p.kill()
            p.join(timeout=grace_s)
