"""Compare a Megatron checkpoint with the HF model it came from: logits and every layer's hidden state.

    python conversion/compare.py --hf ./Qwen2.5-7B-Instruct --megatron ./qwen7b-tp2pp2 --tp 2 --pp 2

Both models run the same seeded random tokens; prints the max |megatron - hf| of the logits and of each layer's
output. Exit code 0 when every difference is <= --tol, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF checkpoint dir (the oracle, run with transformers)")
    p.add_argument("--megatron", required=True, help="Megatron checkpoint dir")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load the checkpoint at")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="max allowed abs difference (default 1e-4, for float32; use ~0.1-0.5 for bfloat16)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before spawned ranks are abandoned")
    return p


def main(argv=None) -> int:
    from spark_megatron.checkpoint.comparison import compare_checkpoints
    from spark_megatron.checkpoint.launcher import run_cli

    a = build_parser().parse_args(argv)
    box = {}

    def run():
        box["report"] = compare_checkpoints(a.hf, a.megatron, a.tp, a.pp, a.seq_len, a.batch, a.seed, a.timeout)

    rc = run_cli(run)
    if rc:
        return rc
    report = box["report"]
    ok = report.worst <= a.tol
    if os.environ.get("RANK", "0") == "0":  # every rank holds the merged report; one prints it
        for line in report.lines():
            print(line)
        print(f"{'PASS' if ok else 'FAIL'}: worst max abs diff {report.worst:.3e} (tol {a.tol:.1e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
