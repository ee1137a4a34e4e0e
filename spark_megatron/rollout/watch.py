"""Engines under watch: every wait on a rollout engine has a deadline, and a dead or hung engine ends the run
with one line that names the engine and what it was doing.

A colocated engine lives inside its trainer rank, so "the engine hangs" means the rank is stuck in a call that
may never return (a collective inside vLLM, a wedged kernel): only another thread can act. `EngineWatch` arms a
timer around each engine call; when it fires, the rank writes the one-line reason to its status file and stderr
and exits with `HUNG_EXIT`. Around each call the rank also records what the engine is doing in that status file,
so when the rank dies outright (killed, out of memory) the process that spawned it (`parallel/spawn.py`, see
`parallel/rank_status.py`) can still say which engine died during which operation. Engine exceptions leave the
call as `EngineFailure`, whose message is that one line.
"""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

from spark_megatron.parallel.rank_status import HUNG_EXIT, status_path, write_status


class EngineFailure(RuntimeError):
    """A rollout engine died, hung or failed; the message is one line naming the engine and the operation."""

    one_line = True
    """The rank spawner reports the message alone (the traceback stays in the rank's output)."""


class EngineWatch:
    """Deadline and status record around the calls one rank makes into its engine."""

    def __init__(self, label: str, timeout_s: float, rank: int, setting: str = "rollout.engine_timeout_s"):
        """`setting`: the config key of the deadline, named in the hang message."""
        self.label, self.timeout_s, self.setting = label, float(timeout_s), setting
        self._path = status_path(rank)
        self._lock = threading.Lock()

    def _record(self, text: str) -> None:
        write_status(self._path, text)

    def _expired(self, op: str) -> None:
        with self._lock:
            line = f"{self.label} hung: {op} did not finish within {self.timeout_s:g} s ({self.setting})"
            self._record(f"hung: {line}")
            print(f"error: {line}", file=sys.stderr, flush=True)
            os._exit(HUNG_EXIT)  # the main thread may be inside a collective that never returns

    @contextmanager
    def __call__(self, op: str, passthrough: tuple = ()):
        """`with watch("generate"): engine.generate(...)`. Exceptions of the `passthrough` types keep their type
        (weight-push errors, which every rank raises together with its own clear message)."""
        self._record(f"busy: {op} in {self.label}")
        timer = threading.Timer(self.timeout_s, self._expired, args=(op,))
        timer.daemon = True
        timer.start()
        try:
            yield
        except (EngineFailure, *passthrough):
            raise
        except Exception as e:  # noqa: BLE001 - one line, the cause stays chained for the rank log
            first = (str(e).strip().splitlines() or [""])[0]
            raise EngineFailure(f"{self.label} failed during {op}: {type(e).__name__}: {first}") from e
        finally:
            timer.cancel()
            self._record("")
