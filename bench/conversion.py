"""Benchmark: HF -> Megatron -> HF conversion of a full-width, reduced-depth model against raw safetensors I/O.

Builds a random-weight bf16 checkpoint from a published config (configs/models/, depth reduced; sharded like the
hub's), then in one run measures
  baseline          safetensors.torch load_file + save_file of every shard, page cache only and with an fsync
                    per file (best of the passes, interleaved with the conversions),
  hf->megatron      convert_hf_to_megatron at --tp x --pp (ranks write their .distcp files directly),
  megatron->hf      export_megatron_to_hf with --workers processes (one HF file at a time per worker),
and checks the round trip is bit-exact (names and config.json included). Per direction it reports seconds and the
ratio to both baselines ("work": what the ranks spend on the model, from skeleton build to published directory,
fsync included; "wall": plus process spawn and imports, a size-independent cost), and each rank's peak resident
memory above its RSS after imports, as a multiple of its share of the model (bytes / ranks), next to the bound
1.2 x share + the largest tensor.

    python bench/conversion.py --model qwen2_5_7b_instruct --layers 2 --tp 1
    python bench/conversion.py --model qwen2_5_vl_32b_instruct --layers 2 --vision-depth 2 --tp 2 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(root: Path, args) -> Path:
    from spark_megatron.models.random_checkpoint import reduced_config, write_random_checkpoint

    cfg = reduced_config(ROOT / "configs" / "models" / f"{args.model}.json", args.layers, args.vision_depth)
    return write_random_checkpoint(cfg, root / "hf", max_shard_bytes=args.shard_bytes)


def baseline_pass(hf_dir: Path, scratch: Path, durable: bool = False) -> float:
    """load_file + save_file of every safetensors shard (+ fsync of each written file if durable); seconds."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    os.sync()  # every timed phase starts with the disk idle (see conversion_pass)
    t0 = time.perf_counter()
    for f in sorted(hf_dir.glob("*.safetensors")):
        out = scratch / f.name
        save_file(load_file(str(f)), str(out), metadata={"format": "pt"})
        if durable:
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    return elapsed


def check_round_trip(a: Path, b: Path) -> int:
    import torch

    from spark_megatron.models.weights import HFCheckpointReader

    ra, rb = HFCheckpointReader(a), HFCheckpointReader(b)
    if set(ra.keys()) != set(rb.keys()):
        raise SystemExit(f"round trip changed the tensor set: {sorted(set(ra.keys()) ^ set(rb.keys()))[:3]}")
    for k in ra.keys():
        if ra.get(k).dtype != rb.get(k).dtype or not torch.equal(ra.get(k), rb.get(k)):
            raise SystemExit(f"round trip changed tensor {k}")
        ra.release(k)
        rb.release(k)
    if json.loads((a / "config.json").read_text()) != json.loads((b / "config.json").read_text()):
        raise SystemExit("round trip changed config.json")
    return len(ra.keys())


def conversion_pass(hf: Path, root: Path, args) -> dict:
    """One HF -> Megatron -> HF round trip through the public API; per-rank stats plus wall times."""
    from spark_megatron.checkpoint import convert_hf_to_megatron, export_megatron_to_hf

    for p in (root / "mg", root / "back"):
        shutil.rmtree(p, ignore_errors=True)
    # Each timed phase starts with the disk idle: otherwise a phase pays for the writeback of the one before it
    # (the import's freshly fsynced 5 GB, a deleted tree's freed extents), which on this VM's disk moved the
    # single-worker VL-32B export between 3 and 11 s from run to run.
    os.sync()
    t0 = time.perf_counter()
    imp = convert_hf_to_megatron(hf, root / "mg", tp=args.tp, pp=args.pp, progress=False)
    t1 = time.perf_counter()
    os.sync()
    t2 = time.perf_counter()
    exp = export_megatron_to_hf(root / "mg", root / "back", workers=args.workers, progress=False)
    t3 = time.perf_counter()
    return {"imp": imp, "exp": exp, "imp_wall": t1 - t0, "exp_wall": t3 - t2,
            "imp_work": max(r["build_s"] + r["write_s"] for r in imp),
            "exp_work": max(r["plan_s"] + r["write_s"] for r in exp)}


def largest_tensor(hf: Path) -> int:
    from spark_megatron.models.weights import HFCheckpointReader

    r = HFCheckpointReader(hf)
    return max(r.info(k).nbytes for k in r.keys())


def _row(name, seconds, nbytes, base, durable):
    return f"{name:<34} {seconds:8.2f} {nbytes / seconds / 1e6:9.0f} {base / seconds:9.2f} {durable / seconds:9.2f}"


def _memory(name: str, stats: list, share: int, largest: int) -> list:
    lines = []
    for i, st in enumerate(stats):
        over = st["peak_rss_bytes"] - st["rss_after_init_bytes"]
        bound = 1.2 * share + largest
        lines.append(f"  {name} rank {i}: peak RSS over post-import RSS {over / 1e6:7.0f} MB = {over / share:4.2f}x "
                     f"its share ({share / 1e6:.0f} MB); bound 1.2x share + largest tensor = {bound / 1e6:.0f} MB "
                     f"({'within' if over <= bound else 'OVER'})")
    return lines


def report(args, nbytes: int, n: int, largest: int, base: float, durable: float, passes: list) -> None:
    best = {k: min(p[k] for p in passes) for k in ("imp_work", "exp_work", "imp_wall", "exp_wall")}
    last = passes[-1]
    print(f"model: {args.model}, {args.layers} layers{f', {args.vision_depth} vision blocks' if 'vl' in args.model else ''}"
          f", {nbytes / 1e9:.2f} GB bf16 in {n} tensors (largest {largest / 1e6:.0f} MB); round trip bit-exact "
          f"(tensors, names, config.json); best of {len(passes)} passes; import TP{args.tp} x PP{args.pp}, export "
          f"{args.workers} worker(s)")
    print(f"{'phase':<34} {'seconds':>8} {'MB/s':>9} {'x base':>9} {'x durable':>9}   (x = baseline s / phase s)")
    print(_row("baseline load_file+save_file", base, nbytes, base, durable))
    print(_row("  same + fsync per file (durable)", durable, nbytes, base, durable))
    print(_row("hf->megatron work", best["imp_work"], nbytes, base, durable))
    print(_row("megatron->hf work", best["exp_work"], nbytes, base, durable))
    print(_row("hf->megatron wall (spawn+imports)", best["imp_wall"], nbytes, base, durable))
    print(_row("megatron->hf wall (spawn+imports)", best["exp_wall"], nbytes, base, durable))
    imp0, exp0 = last["imp"][0], last["exp"][0]
    print(f"  last import rank 0: skeleton {imp0['build_s']:.2f}s, stream+write+publish {imp0['write_s']:.2f}s, "
          f"rank start (imports, process group) {imp0['init_s']:.2f}s")
    print(f"  last export worker 0: plan {exp0['plan_s']:.2f}s, stream+write+publish {exp0['write_s']:.2f}s, "
          f"worker start {exp0['init_s']:.2f}s")
    for line in _memory("hf->megatron", last["imp"], nbytes // (args.tp * args.pp), largest) + \
            _memory("megatron->hf", last["exp"], nbytes // args.workers, largest):
        print(line)


def run(args) -> None:
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_conv_", dir=args.dir))
    root.mkdir(parents=True, exist_ok=True)
    try:
        hf = build_model(root, args)
        nbytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        bases, durables, passes = [baseline_pass(hf, root / "scratch")], [], []
        for _ in range(args.passes):
            passes.append(conversion_pass(hf, root, args))
            bases.append(baseline_pass(hf, root / "scratch"))
            durables.append(baseline_pass(hf, root / "scratch", durable=True))
        n = check_round_trip(hf, root / "back")
        report(args, nbytes, n, largest_tensor(hf), min(bases), min(durables), passes)
        print(f"  baseline passes: {', '.join(f'{b:.2f}s' for b in bases)}; durable: "
              f"{', '.join(f'{b:.2f}s' for b in durables)} (best used)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2_5_7b_instruct", help="config name in configs/models/")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (depth reduced from the published)")
    p.add_argument("--vision-depth", type=int, default=2, help="vision blocks of a VL model")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="export workers")
    p.add_argument("--passes", type=int, default=2, help="round trips measured (best is reported)")
    p.add_argument("--shard-bytes", type=int, default=2 * 10**9, help="source checkpoint shard size")
    p.add_argument("--dir", default=None, help="parent of the scratch directory (default: the system temp dir)")
    p.add_argument("--keep", default=None, help="keep the files in this directory instead of a temp dir")
    run(p.parse_args())


if __name__ == "__main__":
    main()
