"""Benchmark: HF -> Megatron (TP1) -> HF conversion throughput against plain safetensors read+write.

Builds a random Qwen2 of a few hundred MB (fp32), then in one run measures
  baseline   safetensors.torch.load_file + save_file of every shard (best of two passes, before and after),
  import     convert_hf_to_megatron(tp=1)  (one spawned rank),
  export     export_megatron_to_hf(tp=1)   (one spawned rank),
and checks the round trip is bit-exact. Throughput = model bytes / time; the ratio is against the baseline.
"wall" includes spawning the rank and importing torch/megatron (seconds, independent of model size);
"work" is what the rank spends on the model itself (build + read + write incl. fsync and atomic publish).
Peak RSS is the rank's, relative to the model's bytes ("over init" subtracts the RSS after imports).

    python bench/conversion.py [--hidden 768 --layers 4 --vocab 16384] [--keep DIR]
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
    return f"{name:<34} {seconds:8.2f} {mbps:10.1f} {base_s / seconds:8.2f}"


def run(args) -> None:
    from spark_megatron.checkpoint import convert_hf_to_megatron, export_megatron_to_hf

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_conv_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        hf = build_model(root, args)
        nbytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        base1 = baseline_pass(hf, root / "scratch")
        t0 = time.perf_counter()
        imp = convert_hf_to_megatron(hf, root / "mg", tp=1, pp=1, progress=False)[0]
        imp_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        exp = export_megatron_to_hf(root / "mg", root / "hf2", tp=1, pp=1, progress=False)[0]
        exp_wall = time.perf_counter() - t0
        base2 = baseline_pass(hf, root / "scratch")
        base = min(base1, base2)
        durable = min(baseline_pass(hf, root / "scratch", durable=True) for _ in range(2))
        n = check_round_trip(hf, root / "hf2")
        imp_work = imp["build_s"] + imp["load_s"] + imp["save_s"]
        exp_work = exp["load_s"] + exp["write_s"]
        print(f"model: {nbytes / 1e6:.1f} MB fp32, {n} tensors; round trip bit-exact")
        print(f"{'phase':<34} {'seconds':>8} {'MB/s':>10} {'ratio':>8}   (ratio = baseline s / phase s)")
        print(_row("baseline safetensors read+write", base, nbytes, base))
        print(_row("  same + fsync (durable; for info)", durable, nbytes, base))
        print(_row("hf->megatron work", imp_work, nbytes, base))
        print(_row("megatron->hf work", exp_work, nbytes, base))
        print(_row("round trip work (per direction)", (imp_work + exp_work) / 2, nbytes, base))
        print(_row("hf->megatron wall (spawn+imports)", imp_wall, nbytes, base))
        print(_row("megatron->hf wall (spawn+imports)", exp_wall, nbytes, base))
        print(f"  import detail: build {imp['build_s']:.2f}s, read+shard {imp['load_s']:.2f}s, "
              f"dist-ckpt save+publish {imp['save_s']:.2f}s; rank init (imports, process group) {imp['init_s']:.2f}s")
        print(f"  export detail: build+dist-ckpt load {exp['load_s']:.2f}s, stream+write+publish "
              f"{exp['write_s']:.2f}s; rank init {exp['init_s']:.2f}s")
        for name, st in (("hf->megatron", imp), ("megatron->hf", exp)):
            over = st["peak_rss_bytes"] - st["rss_after_init_bytes"]
            print(f"  {name} peak RSS {st['peak_rss_bytes'] / 1e6:.0f} MB = {st['peak_rss_bytes'] / nbytes:.2f}x model;"
                  f" over init {over / 1e6:.0f} MB = {over / nbytes:.2f}x model")
        print(f"  baseline passes: {base1:.2f}s, {base2:.2f}s (best used); vs the durable baseline the work ratios "
              f"are {durable / imp_work:.2f} (import), {durable / exp_work:.2f} (export)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768, help="hidden size (multiple of 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--keep", default=None, help="keep the files in this directory instead of a temp dir")
    run(p.parse_args())


if __name__ == "__main__":
    main()
