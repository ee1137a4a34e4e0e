"""The sync channel's store listens only where it is told, and its control messages build only plan types."""
from __future__ import annotations

import pickle
import threading

import pytest
import torch

pytestmark = pytest.mark.unit


def _listening_ports() -> dict:
    import psutil

    return {c.laddr.port: c.laddr.ip for c in psutil.Process().net_connections(kind="tcp") if c.status == "LISTEN"}


def test_store_binds_to_the_given_host_and_messages_roundtrip():
    from spark_megatron.parallel.spawn import free_port
    from spark_megatron.sync.actor import _Producer
    from spark_megatron.sync.channel import SyncChannel
    from spark_megatron.sync.manifest import TensorSpec, plan_buckets

    port = free_port()
    joined = {}
    member = threading.Thread(target=lambda: joined.update(ch=SyncChannel.connect("127.0.0.1", port, 1, 2, False,
                                                                                  timeout_s=60)))
    member.start()
    master = SyncChannel.connect("127.0.0.1", port, 0, 2, True, timeout_s=60)
    member.join()
    assert _listening_ports().get(port) == "127.0.0.1"  # torch's own store server listens on '::' / 0.0.0.0
    plan = plan_buckets([[TensorSpec("w", (2, 3), torch.bfloat16)]], 1 << 20, [_Producer(0, 0, 0)])
    msg = {"op": "begin", "plan": plan, "version": 3}
    got = {}
    reader = threading.Thread(target=lambda: got.update(msg=joined["ch"].recv_obj(src=0)))
    reader.start()
    master.send_obj(msg)
    reader.join()
    assert got["msg"] == msg


def test_channel_refuses_to_unpickle_anything_else():
    import io
    import os

    from spark_megatron.sync.channel import _SafeUnpickler

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    with pytest.raises(pickle.UnpicklingError, match="refusing to build posix.system"):
        _SafeUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    assert _SafeUnpickler(io.BytesIO(pickle.dumps({"op": "close", "x": (1, 2.0, torch.float32)}))).load() == \
        {"op": "close", "x": (1, 2.0, torch.float32)}
