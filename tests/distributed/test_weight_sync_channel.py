"""The disaggregated transport: one actor member pushes over a side gloo group to two engine processes.

A plan rejected by one engine process is rejected by all of them (the other one, which accepted, writes nothing);
accepted pushes arrive bit-exactly in both, in whole reload units.
"""
from __future__ import annotations

import threading

import pytest
import torch

from spark_megatron.parallel.spawn import free_port, run_on_ranks

pytestmark = pytest.mark.distributed

EXTRA = "model.extra_head.weight"


def _base_pairs(scale: float = 1.0) -> list:
    g = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.self_attn.{p}_proj.{k}" for i in range(2)
                                             for k in ("weight", "bias") for p in "qkv"] + ["model.norm.weight"]
    return [(n, torch.randn((8, 4) if n.endswith("weight") else (8,), generator=g) * scale) for n in names]


class _TableEngine:
    """Minimal engine: a fixed tensor table, destination tensors, a log of loaded bucket names."""

    def __init__(self, pairs):
        from spark_megatron.sync import ExpectedWeights, TensorSpec

        self.dest = {n: torch.zeros_like(t) for n, t in pairs}
        self.expected = ExpectedWeights({n: TensorSpec.of(n, t) for n, t in pairs}, where="table engine")
        self.loaded, self.policy_version, self.stale = [], 0, None

    def expected_weights(self):
        return self.expected

    def begin_update(self, version):
        pass

    def load_bucket(self, named):
        self.loaded.append([n for n, _ in named])
        for n, t in named:
            self.dest[n].copy_(t)

    def finish_update(self, version):
        self.policy_version = version

    def abort_update(self, reason, dirty):
        self.stale = reason if dirty else None


def _engine_member(rank, world, port):
    from spark_megatron.sync.channel import SyncChannel, serve_weight_updates

    pairs = _base_pairs()
    if rank == 1:
        pairs.append((EXTRA, torch.zeros(8, 4)))  # this engine knows one more tensor than the other
    engine = _TableEngine(pairs)
    channel = SyncChannel.connect("127.0.0.1", port, rank + 1, world + 1, is_master=False, timeout_s=120)
    outcomes = serve_weight_updates(channel, [engine], require_all=False)
    channel.close()
    return dict(outcomes=outcomes, version=engine.policy_version, dest=engine.dest, loaded=engine.loaded,
                stale=engine.stale)


def test_channel_pushes_to_two_engine_processes_and_rejects_for_all():
    from spark_megatron.sync import WeightValidationError, push_source
    from spark_megatron.sync.channel import ChannelSink, SyncChannel

    port, result = free_port(), {}

    def engines():
        try:
            result["ranks"] = run_on_ranks(_engine_member, 2, port, timeout_s=180)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=engines, daemon=True)
    t.start()
    sink = ChannelSink(SyncChannel.connect("127.0.0.1", port, 0, 3, is_master=True, timeout_s=120))
    push_source([sink], _base_pairs(2.0), version=1, bucket_bytes=200)
    with pytest.raises(WeightValidationError, match=f"unknown tensor '{EXTRA}'"):
        push_source([sink], _base_pairs(5.0) + [(EXTRA, torch.ones(8, 4))], version=2, bucket_bytes=200)
    final = _base_pairs(3.0)
    push_source([sink], final, version=3, bucket_bytes=200)
    sink.close()
    import time; t0 = time.time()
    t.join(timeout=180)
    print("join", time.time() - t0)
    if "error" in result:
        raise result["error"]
    for r in result["ranks"]:
        assert r["outcomes"] == {"committed": 2, "rejected": 1} and r["version"] == 3 and r["stale"] is None
        assert all(torch.equal(r["dest"][n], t) for n, t in final)
        assert not any(EXTRA in names for names in r["loaded"])
        assert any(len(names) == 6 for names in r["loaded"])  # a qkv module (3 weights + 3 biases) in one bucket
    assert torch.equal(result["ranks"][1]["dest"][EXTRA], torch.zeros(8, 4))
