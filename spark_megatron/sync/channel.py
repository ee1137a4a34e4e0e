"""A side process group between the actor's sync rank and rollout-engine processes (disaggregated rollout).

The engine processes are not members of the trainer's torch.distributed world (vLLM initialises its own), so
the channel is a separate gloo (CPU) or NCCL (GPU) process group built directly on a TCPStore. Member 0 is the
actor's global rank 0 (it holds a `ChannelSink`); members 1..n are engine processes running
`serve_weight_updates`. Buckets travel as raw broadcasts of the flat buffer; control messages are small pickled
objects. Every bucket is preceded by an 8-byte header, so an actor-side failure midway can tell the engines to
stop (they then mark themselves stale) instead of leaving them waiting.

Exposure: the store master listens only on the address it is given (a socket bound there is handed to the
TCPStore; torch's own server would listen on every interface), and control messages are unpickled by an
allow-list unpickler that builds nothing but the plan's own types, torch dtypes and plain containers.
"""
from __future__ import annotations

import io
import pickle
import socket
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch

from spark_megatron.sync.bucket import BucketBuffer
from spark_megatron.sync.manifest import SyncPlan
from spark_megatron.sync.push import WeightSyncError, begin_all
from spark_megatron.sync.validation import WeightValidationError

_ABORT = -1
_COMMIT = -2


class SyncChannel:
    """Broadcast-only side group; `rank` 0 is the actor side."""

    def __init__(self, pg, rank: int, size: int, device: torch.device, timeout: Optional[timedelta] = None):
        self.pg, self.rank, self.size, self.device = pg, rank, size, device
        self.timeout = timeout
        """Limit of one transfer (None: the group's own)."""

    @classmethod
    def connect(cls, host: str, port: int, rank: int, size: int, is_master: bool, backend: str = "gloo",
                timeout_s: float = 600, join_timeout_s: Optional[float] = None) -> "SyncChannel":
        """Join the channel; blocks until all `size` members joined (at most `join_timeout_s`, default
        `timeout_s`, the limit of every later transfer). Exactly one member is the store master."""
        import torch.distributed as dist

        timeout, join = timedelta(seconds=timeout_s), timedelta(seconds=join_timeout_s or timeout_s)
        listener = _listen(host, port) if is_master else None
        try:
            store = dist.TCPStore(host, port, size, is_master, wait_for_workers=False,
                                  timeout=join,
                                  master_listen_fd=listener.fileno() if listener is not None else None)
        finally:
            if listener is not None:
                listener.detach()  # the store's server owns the socket now
        store = dist.PrefixStore("spark_sync", store)
        if backend == "nccl":
            pg = dist.ProcessGroupNCCL(store, rank, size)
            device = torch.device("cuda", torch.cuda.current_device())
        elif backend == "gloo":
            pg = dist.ProcessGroupGloo(store, rank, size, join)  # joining waits for every member
            device = torch.device("cpu")
        else:
            raise ValueError(f"channel backend must be gloo or nccl, got '{backend}'")
        return cls(pg, rank, size, device, timeout)

    def close(self) -> None:
        """Drop the side group (its sockets close once no member uses them)."""
        self.pg = None

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        if self.timeout is not None:
            opts.timeout = self.timeout
        self.pg.broadcast([t], opts).wait()

    def send_obj(self, obj) -> None:
        """Broadcast a picklable object from this member to all others."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.device), self.rank)
        self.broadcast(data.to(self.device), self.rank)

    def recv_obj(self, src: int):
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(n, src)
        data = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(data, src)
        return _SafeUnpickler(io.BytesIO(data.cpu().numpy().tobytes())).load()

    def header(self, value: int, src: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.broadcast(t, src)
        return int(t.item())


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to `host` only (IPv4 or IPv6, as the address resolves)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(128)
    return sock


_ALLOWED = {
    "spark_megatron.sync.manifest": {"SyncPlan", "BucketPlan", "TensorSpec"},
    "spark_megatron.sync.actor": {"_Producer"},
    "builtins": {"tuple", "list", "dict", "set", "frozenset", "str", "int", "float", "bool"},
}


class _SafeUnpickler(pickle.Unpickler):
    """Builds only the channel's own message types: plans, specs, torch dtypes, plain containers."""

    def find_class(self, module: str, name: str):
        import torch

        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"sync channel: refusing to build {module}.{name}")


class ChannelSink:
    """Actor-side sink forwarding a push to the engine processes of a channel."""

    def __init__(self, channel: SyncChannel):
        if channel.rank != 0:
            raise ValueError("ChannelSink must be channel member 0 (the actor side)")
        self.channel = channel

    def _replies(self) -> Optional[str]:
        errs = [self.channel.recv_obj(src=r) for r in range(1, self.channel.size)]
        return next((e for e in errs if e), None)

    def begin(self, plan: SyncPlan, version: int) -> None:
        self.channel.send_obj({"op": "begin", "plan": plan, "version": version})
        err = self._replies()
        if err:
            raise WeightValidationError(err)

    def push(self, bucket) -> None:
        self.channel.header(bucket.plan.index, src=0)
        self.channel.broadcast(bucket.flat, src=0)

    def commit(self, version: int) -> None:
        self.channel.header(_COMMIT, src=0)
        err = self._replies()
        if err:
            raise WeightSyncError(err)

    def abort(self, reason: str) -> None:
        self.channel.header(_ABORT, src=0)
        self.channel.send_obj(reason)

    def close(self) -> None:
        self.channel.send_obj({"op": "close"})


def _exchange(channel: SyncChannel, msg: Optional[str]) -> Optional[str]:
    """Engine members answer in turn (every member takes part in every broadcast, so each also learns the others'
    answers); returns the first error among all engine members."""
    answers = []
    for r in range(1, channel.size):
        if r == channel.rank:
            channel.send_obj(msg)
            answers.append(msg)
        else:
            answers.append(channel.recv_obj(src=r))
    return next((a for a in answers if a), None)


def _receive_buckets(channel: SyncChannel, sinks: list, plan: SyncPlan) -> tuple:
    """Receive and load buckets until the actor commits or aborts -> (aborted, failure message or None)."""
    buf = BucketBuffer(plan, channel.device, role="engine")  # pooled: the next push reuses its pages
    failure = None
    try:
        while True:
            idx = channel.header(0, src=0)
            if idx in (_ABORT, _COMMIT):
                break
            bucket = buf.bucket(plan.buckets[idx])
            channel.broadcast(bucket.flat, src=0)
            if failure is None:
                try:
                    for s in sinks:
                        s.push(bucket)
                except WeightSyncError as e:  # keep receiving: the actor side is still sending
                    failure = str(e)
    finally:
        buf.release()
    if idx == _ABORT:
        failure = f"actor aborted the push: {channel.recv_obj(src=0)}"
    if failure is not None:
        for s in sinks:
            s.abort(failure)
    return idx == _ABORT, failure


def _apply_push(channel: SyncChannel, sinks: Sequence, plan: SyncPlan, version: int) -> str:
    """One push on an engine member: 'rejected', 'failed', 'aborted' or 'committed'."""
    mine = None
    try:
        begin_all(sinks, plan, version)
    except WeightValidationError as e:
        mine = str(e)
    if _exchange(channel, mine):
        if mine is None:  # another engine process rejected: nothing was written here either
            for s in sinks:
                s.abort("another engine rejected the update")
        return "rejected"
    aborted, failure = _receive_buckets(channel, sinks, plan)
    if aborted:
        return "aborted"
    if failure is None:
        try:
            for s in sinks:
                s.commit(version)
        except WeightSyncError as e:
            failure = str(e)
    _exchange(channel, failure)
    return "failed" if failure else "committed"


def serve_one_push(channel: SyncChannel, sinks: Sequence) -> Optional[tuple]:
    """Engine-process side: apply the next push arriving on the channel to `sinks` (an `EngineSink` per engine)
    -> (outcome, version), or None when the actor closed the channel. Outcomes: committed | rejected | failed |
    aborted."""
    msg = channel.recv_obj(src=0)
    if msg["op"] == "close":
        return None
    if msg["op"] != "begin":
        raise WeightSyncError(f"unexpected channel message {msg['op']!r}")
    return _apply_push(channel, sinks, msg["plan"], msg["version"]), msg["version"]


def serve_weight_updates(channel: SyncChannel, sinks: Sequence, on_commit: Optional[Callable] = None) -> dict:
    """Engine-process side: apply every push arriving on the channel to `sinks` (an `EngineSink` per engine)
    until the actor closes it.

    `on_commit(version)` runs after each committed push (tests probe the engines there). Rejected plans are
    answered with the validation error and leave the engines untouched. Returns counts per outcome.
    """
    outcomes: dict = {}
    while (result := serve_one_push(channel, sinks)) is not None:
        outcome, version = result
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "committed" and on_commit is not None:
            on_commit(version)
    return outcomes
