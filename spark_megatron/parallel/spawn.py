"""Run a function on N real ranks (spawned processes, gloo) and re-raise the first failure in the caller.

Used by `spark-megatron train`, the distributed tests and the benchmarks; `fn(rank, world_size, *args)` must be
importable (top level). Each rank's return value comes back to the caller, so checks can be asserted in the
parent. A rank that dies without reporting (killed, or gave up on a hung operation, see `rank_status`) is noticed
within a second and named, with what it was doing, in the failure's one-line `summary`.
"""
from __future__ import annotations

import os
import queue as queue_mod
import shutil
import signal
import socket
import tempfile
import time
import traceback
from typing import Optional

import torch.multiprocessing as mp

from spark_megatron.parallel.rank_status import HUNG_EXIT, STATUS_DIR_ENV, read_status

_INTERRUPTED = object()
"""_collect's answer when a rank got KeyboardInterrupt."""

_GRACE_S = 3.0
"""After a rank failed: how long to look for a rank that died (its death is usually the cause)."""


class RankFailure(RuntimeError):
    """A spawned rank raised or died; the message carries the tracebacks, `summary` one line when the cause is
    known (a dead or hung rank, an exception that is itself one line such as an engine failure, or an error the
    user can act on that the rank already logged: a RunAbort's `user_message`), `exit_code` the code the rank's
    error asks the top level to exit with (None: the caller decides)."""

    def __init__(self, message: str, summary: Optional[str] = None, exit_code: Optional[int] = None):
        super().__init__(f"{summary}\n{message}" if summary and message else (summary or message))
        self.summary, self.exit_code = summary, exit_code

    @property
    def user_message(self) -> Optional[str]:
        return self.summary


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
        queue.put((rank, True, out, None))
    except KeyboardInterrupt:
        queue.put((rank, "interrupted", traceback.format_exc(), None))
    except BaseException as e:  # noqa: BLE001 - everything must reach the parent
        queue.put((rank, False, traceback.format_exc(), _one_line(e)))
    finally:
        try:
            from spark_megatron.parallel.groups import destroy_distributed
            destroy_distributed()
        except Exception:  # noqa: BLE001
            pass


def _one_line(e: BaseException) -> Optional[tuple]:
    """(message, exit code) of an exception that explains itself in one line, else None."""
    message = getattr(e, "user_message", None)
    if message is None and getattr(e, "one_line", False):
        message = str(e)
    return (message, getattr(e, "exit_code", None)) if message else None


def run_on_ranks(fn, world_size: int, *args, timeout_s: float = 600, env: dict | None = None) -> list:
    """Spawn `world_size` processes running `fn(rank, world_size, *args)`; return their results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    status_dir = tempfile.mkdtemp(prefix="spark_ranks_")
    base_env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", STATUS_DIR_ENV: status_dir}
    base_env.update(env or {})
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, base_env))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, failures, summary = {}, [], None
    try:
        summary = _collect(procs, queue, results, failures, timeout_s, status_dir)
        if summary is _INTERRUPTED:
            stop(procs)
    except BaseException:  # an interrupt (or timeout) here: the ranks must not go on (and publish) without us
        stop(procs)
        raise
    finally:
        for p in procs:
            p.join(timeout=5 if failures or summary else 60)
            if p.is_alive():
                p.kill()
        shutil.rmtree(status_dir, ignore_errors=True)
    if summary is _INTERRUPTED:
        raise RankInterrupted("\n".join(failures))
    if failures or summary:
        message, code = summary if isinstance(summary, tuple) else (summary, None)
        raise RankFailure("\n".join(failures), message, code)
    return [results[r] for r in range(world_size)]


def _collect(procs: list, queue, results: dict, failures: list, timeout_s: float, status_dir: str):
    """Read reports until every rank returned, one failed or one died -> the one-line summary, if known: a string
    (a dead or hung rank) or (message, exit code) of an exception that explained itself."""
    deadline = time.monotonic() + timeout_s
    while len(results) < len(procs):
        try:
            rank, ok, payload, one_line = queue.get(timeout=1.0)
        except queue_mod.Empty:
            if _dead(procs, results):
                return _explain(procs, results, status_dir)
            if time.monotonic() > deadline:
                raise RankFailure("", f"ranks {sorted(set(range(len(procs))) - set(results))} did not finish "
                                      f"within {timeout_s:g} s") from None
            continue
        if ok is True:
            results[rank] = payload
            continue
        failures.append(f"--- rank {rank} ---\n{payload}")
        if ok == "interrupted":  # SIGINT reached a rank: the caller stops the others
            return _INTERRUPTED
        end = time.monotonic() + _GRACE_S  # another rank's death or engine failure is likely the cause
        while time.monotonic() < end:
            if _dead(procs, results):
                return _explain(procs, results, status_dir)
            try:
                _, ok2, payload2, one_line2 = queue.get(timeout=0.2)
                if not ok2 and one_line2 and not one_line:
                    one_line = one_line2
            except queue_mod.Empty:
                pass
        return one_line
    return None


def _dead(procs: list, results: dict) -> list:
    """Ranks that exited with a failure status without reporting."""
    return [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _explain(procs: list, results: dict, status_dir: str) -> str:
    """One line for the dead ranks: hung operations they gave up on, else what the first one was doing."""
    time.sleep(0.5)  # ranks that gave up on the same collective exit together: name them all
    dead = _dead(procs, results)
    hung = []
    for r in dead:
        text = read_status(status_dir, r)
        if procs[r].exitcode == HUNG_EXIT and text.startswith("hung: ") and text[6:] not in hung:
            hung.append(text[6:])
    if hung:
        return "; ".join(hung)
    r = dead[0]
    text = read_status(status_dir, r)
    doing = f" during {text[6:]}" if text.startswith("busy: ") else ""
    return f"rank {r} died ({_how(procs[r].exitcode)}){doing}"


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
