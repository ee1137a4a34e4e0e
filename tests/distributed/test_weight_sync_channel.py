"""The disaggregated transport: one actor member pushes over a side gloo group to two engine processes.

A plan rejected by one engine process is rejected by all of them (the other one, which accepted, writes nothing);
accepted pushes arrive bit-exactly in both, in whole reload units.
"""
from __future__ import annotations

import traceback

import pytest
import torch

from spark_megatron.parallel.spawn import free_port
from tests.helpers import TableEngine

pytestmark = pytest.mark.distributed

EXTRA = "model.extra_head.weight"


def _base_pairs(scale: float = 1.0) -> list:
    g = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.self_attn.{p}_proj.{k}" for i in range(2)
                                             for k in ("weight", "bias") for p in "qkv"] + ["model.norm.weight"]
    return [(n, torch.randn((8, 4) if n.endswith("weight") else (8,), generator=g) * scale) for n in names]


def _engine_member(rank, world, port, queue):
    """Engine process `rank` of `world`: serves the channel until the actor closes it, then reports."""
    try:
        from spark_megatron.sync import EngineSink
        from spark_megatron.sync.channel import SyncChannel, serve_weight_updates

        pairs = _base_pairs()
        if rank == 1:
            pairs.append((EXTRA, torch.zeros(8, 4)))  # this engine knows one more tensor than the other
        engine = TableEngine(pairs)
        channel = SyncChannel.connect("127.0.0.1", port, rank + 1, world + 1, is_master=False, timeout_s=120)
        outcomes = serve_weight_updates(channel, [EngineSink(engine, require_all=False, expected=engine.expected)])
        channel.close()
        dest = {n: t.tolist() for n, t in engine.dest.items()}  # plain data: this process exits right after
        queue.put((rank, dict(outcomes=outcomes, version=engine.policy_version, dest=dest, loaded=engine.loaded,
                              stale=engine.stale)))
    except BaseException:  # noqa: BLE001 - reported to the test
        queue.put((rank, traceback.format_exc()))


def test_channel_pushes_to_two_engine_processes_and_rejects_for_all():
    import torch.multiprocessing as mp

    from spark_megatron.sync import WeightValidationError, push_source
    from spark_megatron.sync.channel import ChannelSink, SyncChannel

    # plain processes, not run_on_ranks: engine processes are outside any torch.distributed world
    ctx, port = mp.get_context("spawn"), free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_engine_member, args=(r, 2, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        sink = ChannelSink(SyncChannel.connect("127.0.0.1", port, 0, 3, is_master=True, timeout_s=120))
        push_source([sink], _base_pairs(2.0), version=1, bucket_bytes=200)
        with pytest.raises(WeightValidationError, match=f"unknown tensor '{EXTRA}'"):
            push_source([sink], _base_pairs(5.0) + [(EXTRA, torch.ones(8, 4))], version=2, bucket_bytes=200)
        final = _base_pairs(3.0)
        push_source([sink], final, version=3, bucket_bytes=200)
        sink.close()
        results = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank in range(2):
        r = results[rank]
        assert isinstance(r, dict), r
        assert r["outcomes"] == {"committed": 2, "rejected": 1} and r["version"] == 3 and r["stale"] is None
        assert all(torch.equal(torch.tensor(r["dest"][n], dtype=t.dtype), t) for n, t in final)
        assert not any(EXTRA in names for names in r["loaded"])
        assert any(len(names) == 6 for names in r["loaded"])  # a qkv module (3 weights + 3 biases) in one bucket
    assert torch.equal(torch.tensor(results[1]["dest"][EXTRA]), torch.zeros(8, 4))
