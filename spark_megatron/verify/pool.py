"""A process pool with a hard per-item deadline: an item that overruns is cut off by killing its worker.

`concurrent.futures.ProcessPoolExecutor` cannot cancel a running task, and killing one of its workers breaks
the whole pool. Here every worker owns a pipe; the parent hands out one item at a time, waits on all pipes with
the nearest deadline as timeout, and replaces a worker it had to kill. Workers are started with `forkserver`
(or `spawn`), never `fork`: the trainer process holds threads, CUDA contexts and process groups that must
not be duplicated.

Deadlines count the worker's CPU time (from /proc where available), not wall time, so a busy machine that
starves the workers does not turn ordinary answers into timeouts; a wall-clock cap (`wall_factor` x the limit)
still ends a worker that hangs without using CPU.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable, Optional, Sequence


@dataclass
class PoolResult:
    value: Any = None
    timed_out: bool = False
    error: Optional[str] = None
    """repr of an exception raised by the function, or a note that the worker died."""

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.error is None


def _cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of a process from /proc/<pid>/stat; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class _ItemClock:
    """Time spent by one worker on its current item: CPU time where measurable, else wall time."""

    pid: int
    limit: float
    wall_cap: float
    started: float = field(default_factory=time.monotonic)
    cpu_start: Optional[float] = None
    check_at: float = 0.0
    """Earliest moment the item can be over its limit (a single-threaded worker's CPU time <= wall time)."""

    def __post_init__(self):
        self.cpu_start = _cpu_seconds(self.pid)
        self.check_at = self.started + self.limit

    def used(self, now: float) -> float:
        cpu = _cpu_seconds(self.pid) if self.cpu_start is not None else None
        return now - self.started if cpu is None else cpu - self.cpu_start

    def expired(self, now: float) -> bool:
        """True if over the limit; otherwise moves `check_at` to the next moment it could be."""
        used = self.used(now)
        if used >= self.limit or now - self.started >= self.wall_cap:
            return True
        self.check_at = min(now + max(self.limit - used, 0.01), self.started + self.wall_cap)
        return False


def _serve(conn, fn, init) -> None:
    """Worker loop: run `init`, report ready, then answer (index, item) with (index, ok, value-or-error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    if init is not None:
        init()
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, item = msg
        try:
            conn.send((index, True, fn(item)))
        except Exception as e:  # report, keep serving
            conn.send((index, False, repr(e)))


_READY = "ready"


class _Worker:
    def __init__(self, ctx, fn, init, start_timeout_s: float):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, init), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.start_deadline = time.monotonic() + start_timeout_s

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


class TimeoutPool:
    """Map a picklable module-level `fn` over items in `num_workers` processes, `timeout_s` per item.

    Workers start lazily and persist across calls; use as a context manager or `close()`. Each worker runs
    `init` (e.g. a warm-up that builds parsers and caches) before it takes items, so one-off start-up cost never
    counts against an item's deadline; workers start in the background while the others keep working.
    `preload` names modules the forkserver imports once so that (re)started workers come up quickly.
    `prefetch` items are queued per worker, hiding the parent's wake-up latency on a busy machine.
    `timeout_s` is CPU time per item, capped at `wall_factor * timeout_s` of wall time.
    """

    def __init__(self, fn: Callable[[Any], Any], num_workers: int, timeout_s: float,
                 start_method: str = "forkserver", preload: Sequence[str] = (),
                 init: Optional[Callable[[], None]] = None, start_timeout_s: float = 120.0, prefetch: int = 8,
                 wall_factor: float = 10.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if start_method == "fork":
            raise ValueError("start_method 'fork' is unsafe in a trainer process; use forkserver or spawn")
        self.fn, self.init = fn, init
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = start_timeout_s
        self.prefetch = max(1, prefetch)
        self.wall_factor = max(1.0, wall_factor)
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver" and preload:
            self._ctx.set_forkserver_preload(list(preload))
        self._workers: list[Optional[_Worker]] = [None] * num_workers
        self.restarts = 0
        """Workers replaced after a timeout or a crash (a health metric)."""

    def _kill(self, slot: int) -> None:
        """Kill the worker in `slot`; a fresh one starts when the slot is next needed."""
        worker = self._workers[slot]
        if worker is not None:
            worker.kill()
        self._workers[slot] = None
        self.restarts += 1

    def _dispatch(self, pending: collections.deque, flight: dict, clocks: dict) -> None:
        """Top up every ready worker to `prefetch` items (less near the end of a batch, so that no worker idles
        while another holds a backlog); start workers for empty slots while work remains."""
        outstanding = len(pending) + sum(len(q) for q in flight.values())
        depth = min(self.prefetch, max(1, -(-outstanding // self.num_workers)))
        for slot in range(self.num_workers):
            if not pending:
                return
            if self._workers[slot] is None:
                self._workers[slot] = _Worker(self._ctx, self.fn, self.init, self.start_timeout_s)
            worker = self._workers[slot]
            if not worker.ready:
                continue
            queue = flight.setdefault(slot, collections.deque())
            while pending and len(queue) < depth:
                index, item = pending.popleft()
                worker.conn.send((index, item))
                if not queue:
                    clocks[slot] = self._clock(slot)
                queue.append((index, item))

    def _clock(self, slot: int) -> _ItemClock:
        return _ItemClock(self._workers[slot].proc.pid, self.timeout_s, self.timeout_s * self.wall_factor)

    def _on_started(self, slot: int) -> None:
        worker = self._workers[slot]
        try:
            worker.ready = worker.conn.recv() == _READY
        except (EOFError, OSError):
            worker.ready = False
        if not worker.ready:
            self._kill(slot)
            raise RuntimeError(f"pool worker failed to start (exit code {worker.proc.exitcode})")

    def _abandon(self, slot: int, result: PoolResult, results: list, pending, flight: dict, clocks: dict) -> None:
        """The head item of `slot` gets `result`; items queued behind it go back to the front of `pending`."""
        queue = flight.pop(slot)
        clocks.pop(slot, None)
        results[queue.popleft()[0]] = result
        pending.extendleft(reversed(queue))
        self._kill(slot)

    def _receive(self, slot: int, results: list, pending, flight: dict, clocks: dict) -> None:
        conn, queue = self._workers[slot].conn, flight[slot]
        try:
            while queue and conn.poll():
                index, ok, value = conn.recv()
                assert index == queue[0][0], "pool worker answered out of order"
                queue.popleft()
                results[index] = PoolResult(value=value) if ok else PoolResult(error=value)
                # The worker starts its next item as soon as it sends this result.
                clocks[slot] = self._clock(slot)
        except (EOFError, OSError):
            self._abandon(slot, PoolResult(error="worker process died"), results, pending, flight, clocks)
            return
        if not queue:
            del flight[slot], clocks[slot]

    def map(self, items: Sequence[Any]) -> list[PoolResult]:
        """Results in input order. An item past its deadline gets `timed_out=True`; the rest still complete.

        Each worker holds up to `prefetch` items so it never waits for the parent to be scheduled; the clock
        runs for the item a worker is on (from when the previous result arrived).
        """
        results: list[Optional[PoolResult]] = [None] * len(items)
        pending = collections.deque(enumerate(items))
        flight: dict = {}  # slot -> deque of (index, item) sent, oldest = being worked on
        clocks: dict = {}  # slot -> _ItemClock of its oldest item
        while pending or flight:
            self._dispatch(pending, flight, clocks)
            starting = [s for s, w in enumerate(self._workers) if w is not None and not w.ready]
            waits = [c.check_at for c in clocks.values()] + [self._workers[s].start_deadline for s in starting]
            by_conn = {self._workers[s].conn: s for s in list(flight) + starting}
            for conn in wait(list(by_conn), timeout=max(0.0, min(waits) - time.monotonic())):
                slot = by_conn[conn]
                if slot in flight:
                    self._receive(slot, results, pending, flight, clocks)
                else:
                    self._on_started(slot)
            now = time.monotonic()
            for slot in [s for s, c in clocks.items() if now >= c.check_at and c.expired(now)]:
                self._abandon(slot, PoolResult(timed_out=True), results, pending, flight, clocks)
            for slot in starting:
                worker = self._workers[slot]
                if worker is not None and not worker.ready and now >= worker.start_deadline:
                    self._kill(slot)
                    raise RuntimeError(f"pool worker did not start within {self.start_timeout_s:.0f} s")
        return results  # type: ignore[return-value]

    def worker_pids(self) -> list:
        """Process ids of the live workers (for CPU accounting in benchmarks)."""
        return [w.proc.pid for w in self._workers if w is not None and w.proc.is_alive()]

    def close(self) -> None:
        for slot, worker in enumerate(self._workers):
            if worker is not None:
                worker.stop()
                self._workers[slot] = None

    def __enter__(self) -> "TimeoutPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
