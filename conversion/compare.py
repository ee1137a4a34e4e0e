"""Compare a Megatron checkpoint with the HF model it came from: logits and every layer's hidden state.

    python conversion/compare.py --hf ./Qwen2.5-7B-Instruct --megatron ./qwen7b-tp2pp2 --tp 2 --pp 2

Both models run the same seeded random tokens (Qwen2.5-VL: each row starts with a seeded random image spanning
several vision attention windows). float32 checkpoints pass when every max |megatron - hf| is <= --tol.
bfloat16/float16 checkpoints are judged against HF's own rounding error, measured in the same run on the same
inputs: for the logits and each layer, the worst position's relative L2 difference megatron vs hf (both at the
checkpoint dtype) must be <= --multiple x that of hf(dtype) vs hf(float32); both numbers are printed.
Exit code 0 on PASS, 1 on FAIL, 2 on bad input, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from spark_megatron.checkpoint.comparison import DEFAULT_MULTIPLE, DEFAULT_TOL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF checkpoint dir (the oracle, run with transformers)")
    p.add_argument("--megatron", required=True, help="Megatron checkpoint dir")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load the checkpoint at")
    p.add_argument("--seq-len", type=int, default=32, help="text tokens per sequence (default 32)")
    p.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids and images")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL,
                   help=f"float32 checkpoints: max allowed abs difference (default {DEFAULT_TOL:g})")
    p.add_argument("--multiple", type=float, default=DEFAULT_MULTIPLE,
                   help="bfloat16/float16 checkpoints: allowed multiple of HF's own rounding error "
                        f"(default {DEFAULT_MULTIPLE:g})")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before spawned ranks are abandoned")
    return p


def main(argv=None) -> int:
    from spark_megatron.checkpoint.comparison import compare_checkpoints
    from spark_megatron.checkpoint.launcher import run_cli

    a = build_parser().parse_args(argv)
    box = {}

    def run():
        box["result"] = compare_checkpoints(a.hf, a.megatron, a.tp, a.pp, a.seq_len, a.batch, a.seed, a.timeout)

    rc = run_cli(run)
    if rc:
        return rc
    ok, lines, verdict = box["result"].judge(a.tol, a.multiple)
    if os.environ.get("RANK", "0") == "0":  # every rank holds the merged result; one prints it
        for line in lines:
            print(line)
        print(verdict)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
