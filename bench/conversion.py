"""Benchmark: HF -> Megatron (TP1) -> HF conversion throughput against plain safetensors read+write.

Builds a random Qwen2 of a few hundred MB (fp32), then in one run measures
  baseline   safetensors.torch.load_file + save_file of every shard (best of two passes, before and after),
  import     convert_hf_to_megatron(tp=1)  (one spawned rank),
  export     export_megatron_to_hf(tp=1)   (one spawned rank),
and checks the round trip is bit-exact. Throughput = model bytes / time; the ratio is against the baseline.
The machine may be shared: baseline and conversions each report the best of several passes.
"wall" includes spawning the rank and importing torch/megatron (seconds, independent of model size);
"work" is what the rank spends on the model itself (build + read + write incl. fsync and atomic publish).
Peak RSS is the rank's, relative to the model's bytes ("over init" subtracts the RSS after imports).

    python bench/conversion.py [--hidden 768 --layers 4 --vocab 16384 --passes 2] [--keep DIR]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def build_model(root: Path, args) -> Path:
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2

    spec = TinyQwen2Spec(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 64 // 4), head_dim=64, vocab_size=args.vocab,
                         tie_word_embeddings=False)
    return write_tiny_qwen2(root / "hf", spec)


def baseline_pass(hf_dir: Path, scratch: Path, durable: bool = False) -> float:
    """load_file + save_file of every safetensors shard (+ fsync of each written file if durable); seconds."""
    import os

    from safetensors.torch import load_file, save_file

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    t0 = time.perf_counter()
    for f in sorted(hf_dir.glob("*.safetensors")):
        out = scratch / f.name
        save_file(load_file(str(f)), str(out), metadata={"format": "pt"})
        if durable:
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - t0


def check_round_trip(a: Path, b: Path) -> int:
    import torch

    from spark_megatron.models.weights import HFCheckpointReader

    ra, rb = HFCheckpointReader(a), HFCheckpointReader(b)
    if set(ra.keys()) != set(rb.keys()):
        raise SystemExit(f"round trip changed the tensor set: {sorted(set(ra.keys()) ^ set(rb.keys()))[:3]}")
    for k in ra.keys():
        if not torch.equal(ra.get(k), rb.get(k)):
            raise SystemExit(f"round trip changed tensor {k}")
    return len(ra.keys())


def _row(name, seconds, nbytes, base_s):
    mbps = nbytes / seconds / 1e6
    return f"{name:<36} {seconds:8.2f} {mbps:10.1f} {base_s / seconds:8.2f}"


def conversion_pass(hf: Path, root: Path, i: int) -> dict:
    """One HF -> Megatron -> HF round trip through the public API; rank-side timings plus wall times."""
    from spark_megatron.checkpoint import convert_hf_to_megatron, export_megatron_to_hf

    t0 = time.perf_counter()
    imp = convert_hf_to_megatron(hf, root / f"mg{i}", tp=1, pp=1, progress=False)[0]
    imp_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    exp = export_megatron_to_hf(root / f"mg{i}", root / f"hf{i}", tp=1, pp=1, progress=False)[0]
    exp_wall = time.perf_counter() - t0
    return {"imp": imp, "exp": exp, "imp_wall": imp_wall, "exp_wall": exp_wall,
            "imp_work": imp["build_s"] + imp["load_s"] + imp["save_s"], "exp_work": exp["load_s"] + exp["write_s"]}


def report(nbytes: int, n: int, base: float, durable: float, passes: list) -> None:
    best = {k: min(p[k] for p in passes) for k in ("imp_work", "exp_work", "imp_wall", "exp_wall")}
    imp, exp = passes[-1]["imp"], passes[-1]["exp"]
    print(f"model: {nbytes / 1e6:.1f} MB fp32, {n} tensors; round trip bit-exact; best of {len(passes)} passes")
    print(f"{'phase':<36} {'seconds':>8} {'MB/s':>10} {'ratio':>8}   (ratio = baseline s / phase s)")
    print(_row("baseline safetensors read+write", base, nbytes, base))
    print(_row("  same + fsync per file (durable)", durable, nbytes, base))
    print(_row("hf->megatron work", best["imp_work"], nbytes, base))
    print(_row("megatron->hf work", best["exp_work"], nbytes, base))
    print(_row("round trip work (per direction)", (best["imp_work"] + best["exp_work"]) / 2, nbytes, base))
    print(_row("hf->megatron wall (spawn+imports)", best["imp_wall"], nbytes, base))
    print(_row("megatron->hf wall (spawn+imports)", best["exp_wall"], nbytes, base))
    print(f"  vs the durable baseline: work ratio {durable / best['imp_work']:.2f} (import), "
          f"{durable / best['exp_work']:.2f} (export)")
    print(f"  last import: build {imp['build_s']:.2f}s, read+shard {imp['load_s']:.2f}s, dist-ckpt save+publish "
          f"{imp['save_s']:.2f}s; rank init (imports, process group) {imp['init_s']:.2f}s")
    print(f"  last export: build+dist-ckpt load {exp['load_s']:.2f}s, stream+write+publish {exp['write_s']:.2f}s")
    for name, st in (("hf->megatron", imp), ("megatron->hf", exp)):
        over = st["peak_rss_bytes"] - st["rss_after_init_bytes"]
        print(f"  {name} rank peak RSS {st['peak_rss_bytes'] / 1e6:.0f} MB = {st['peak_rss_bytes'] / nbytes:.2f}x "
              f"model; above the RSS after imports {over / 1e6:.0f} MB = {over / nbytes:.2f}x model")


def run(args) -> None:
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_conv_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        hf = build_model(root, args)
        nbytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        bases = [baseline_pass(hf, root / "scratch")]
        passes = []
        for i in range(args.passes):
            passes.append(conversion_pass(hf, root, i))
            bases.append(baseline_pass(hf, root / "scratch"))
        durable = min(baseline_pass(hf, root / "scratch", durable=True) for _ in range(2))
        n = check_round_trip(hf, root / f"hf{args.passes - 1}")
        report(nbytes, n, min(bases), durable, passes)
        print(f"  baseline passes: {', '.join(f'{b:.2f}s' for b in bases)} (best used)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768, help="hidden size (multiple of 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--passes", type=int, default=2, help="round trips measured (best is reported)")
    p.add_argument("--keep", default=None, help="keep the files in this directory instead of a temp dir")
    run(p.parse_args())


if __name__ == "__main__":
    main()
