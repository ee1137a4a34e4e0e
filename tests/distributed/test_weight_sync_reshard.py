"""The TP reshard of an actor push (sync/reshard.py) on real gloo ranks, without an engine: the bucket stream is
bit-identical to `export_hf_weights` (the all_gather + mapping reference) for fp32 and bf16 exports, tiny and
large buckets, and with parameters forced onto the all_gather fallback; the memory counter stays within one
bucket + one tensor on every rank; the plan is reused while nothing changes.
"""
from __future__ import annotations

import contextlib
import zlib

import pytest
import torch

from spark_megatron.parallel.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

CASES = (("fp32, 64 KiB buckets", torch.float32, 64 << 10, False),
         ("fp32, 64 MiB buckets", torch.float32, 64 << 20, False),
         ("bf16, 256 KiB buckets", torch.bfloat16, 256 << 10, False),
         ("fp32, gate/up + o_proj on the fallback", torch.float32, 256 << 10, True))


class _Recorder:
    """Sink keeping a copy of every tensor it is pushed."""

    def __init__(self):
        self.got = {}

    def begin(self, plan, version):
        pass

    def push(self, bucket):
        for name, t in bucket.named_tensors():
            self.got[name] = t.clone()

    def commit(self, version):
        pass

    def abort(self, reason):
        pass


def _perturb(model) -> None:
    """Distinct values per TP shard; replicated parameters stay identical across TP ranks."""
    from megatron.core import parallel_state as ps

    from spark_megatron.models.weights import global_param_names

    tp_rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in global_param_names(model):
            shard = tp_rank if getattr(p, "tensor_model_parallel", False) else 0
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{shard}".encode()))
            p.add_(torch.randn(p.shape, generator=g))


@contextlib.contextmanager
def _fallback_for(classes: tuple):
    """derive_layout gives up on these mapping classes (their parameters take the all_gather fallback)."""
    import spark_megatron.sync.reshard as reshard

    original = reshard.derive_layout
    reshard.derive_layout = lambda m, shape, tp: None if isinstance(m, classes) else original(m, shape, tp)
    reshard._JOBS.clear()  # jobs cached by an earlier push hold the derived layouts
    try:
        yield
    finally:
        reshard.derive_layout = original
        reshard._JOBS.clear()


def _job(rank, world, hf_dir):
    from spark_megatron.models.mapping import GatedMLPMapping, RowParallelMapping
    from spark_megatron.models.weights import export_hf_weights
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.sync import LiveBytes, push_actor_weights
    from spark_megatron.sync import reshard
    from spark_megatron.sync import actor_plan
    from tests.helpers import loaded_qwen2_stage

    init_distributed(2, 1)
    shape, registry, model = loaded_qwen2_stage(hf_dir)
    _perturb(model)
    tied = shape.tie_word_embeddings
    out = {}
    for name, dtype, bucket_bytes, fallback in CASES:
        ref = {n: t.clone() for n, t in export_hf_weights(model, registry, tied, dtype)}
        sink, tracker = (_Recorder() if rank == 0 else None), LiveBytes()
        with _fallback_for((GatedMLPMapping, RowParallelMapping) if fallback else ()):
            stats = push_actor_weights([model], registry, 1, bucket_bytes, sink=sink, tied=tied, dtype=dtype,
                                       tracker=tracker)
            fallbacks = sum(job.layout is None for job in reshard._JOBS[model][2])
        exact = None if sink is None else (set(sink.got) == set(ref) and all(
            torch.equal(sink.got[n], ref[n]) for n in ref))
        out[name] = dict(exact=exact, peak=tracker.peak, transient=tracker.largest_transient,
                         capacity=stats.bucket_capacity, bytes=stats.bytes, buckets=stats.buckets,
                         fallbacks=fallbacks)
    same = actor_plan([model], registry, 1 << 20, tied, torch.float32)
    out["plan reused"] = actor_plan([model], registry, 1 << 20, tied, torch.float32) is same
    out["plan rebuilt"] = actor_plan([model], registry, 2 << 20, tied, torch.float32) is not same
    return out


def test_tp2_reshard_is_bit_exact_and_within_one_bucket(tmp_path):
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2

    # 8 heads in 4 query groups: each TP2 rank holds 2 groups, so its q/k/v rows are 2 separate runs of its
    # shard that the peer packs into one message
    hf_dir = write_tiny_qwen2(tmp_path / "tiny", TinyQwen2Spec(num_attention_heads=8, num_key_value_heads=4,
                                                               head_dim=16))
    ranks = run_on_ranks(_job, 2, str(hf_dir), timeout_s=300)
    for name, _dtype, bucket_bytes, fallback in CASES:
        r0 = ranks[0][name]
        assert r0["exact"], f"{name}: pushed tensors differ from export_hf_weights"
        assert (r0["fallbacks"] > 0) == fallback, r0
        assert r0["buckets"] > (1 if bucket_bytes < r0["bytes"] else 0)
        for rank, r in enumerate(ranks):
            info = r[name]
            assert info["peak"] <= info["capacity"] + info["transient"], f"{name} rank {rank}: {info}"
            if bucket_bytes < info["bytes"] / 8:
                assert info["peak"] < info["bytes"] / 2, f"{name} rank {rank}: held {info['peak']} bytes"
    assert ranks[0]["plan reused"] and ranks[0]["plan rebuilt"]


def _vl_job(rank, world, hf_dir):
    """Qwen2.5-VL at TP2 with an odd vision MLP (zero-padded in Megatron): fused vision qkv, padded gate/up and
    down_proj all go through derived layouts (no fallback), bit-exact."""
    from spark_megatron.models.families import load_family
    from spark_megatron.models.weights import HFCheckpointReader, export_hf_weights, load_hf_weights
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.sync import push_actor_weights, reshard

    init_distributed(tp=2, pp=1, seed=0)
    fam, shape = load_family(hf_dir)
    stage = fam.build_stage(shape, "float32")
    registry = fam.mappings(shape)
    load_hf_weights(stage, HFCheckpointReader(hf_dir), registry, shape.tie_word_embeddings)
    ref = {n: t.clone() for n, t in export_hf_weights(stage, registry, shape.tie_word_embeddings, torch.float32)}
    sink = _Recorder() if rank == 0 else None
    push_actor_weights([stage], registry, 1, 256 << 10, sink=sink, tied=shape.tie_word_embeddings,
                       dtype=torch.float32)
    fallbacks = [j.spec.name for j in reshard._JOBS[stage][2] if j.layout is None]
    exact = None if sink is None else (set(sink.got) == set(ref) and all(
        torch.equal(sink.got[n], ref[n]) for n in ref))
    return dict(exact=exact, fallbacks=fallbacks)


def test_vl_reshard_with_padded_vision_mlp_is_bit_exact_without_fallback(tmp_path):
    from spark_megatron.models.tiny_vl_checkpoint import TinyQwen25VLSpec, write_tiny_qwen2_5_vl

    hf_dir = write_tiny_qwen2_5_vl(tmp_path / "vl", TinyQwen25VLSpec(vision_intermediate_size=97))
    ranks = run_on_ranks(_vl_job, 2, str(hf_dir), timeout_s=300)
    assert ranks[0]["exact"], "VL push differs from export_hf_weights"
    assert all(not r["fallbacks"] for r in ranks), [r["fallbacks"] for r in ranks]
