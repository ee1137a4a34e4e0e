"""Convert an HF checkpoint directory to a Megatron checkpoint saved at TP x PP.

    python conversion/hf_to_megatron.py --hf ./Qwen2.5-7B-Instruct --out ./qwen7b-tp2pp2 --tp 2 --pp 2

Without torchrun, TP*PP gloo ranks are spawned on this machine; under torchrun (WORLD_SIZE set) every launched
process is one rank (NCCL on GPUs). The output directory appears only when the conversion has succeeded.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF checkpoint dir (config.json, *.safetensors, tokenizer files)")
    p.add_argument("--out", required=True, help="output Megatron checkpoint dir (must not exist or be empty)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to save at (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to save at (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype of the Megatron checkpoint (default: the HF config's dtype)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                   help="pad the vocab to a multiple of N: the training recipe's parallel."
                        "make_vocab_size_divisible_by (default 128, as there). Recorded in the checkpoint; export, "
                        "compare and the trainer read it from there")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before spawned ranks are abandoned")
    return p


def main(argv=None) -> int:
    from spark_megatron.checkpoint.hf_import import convert_hf_to_megatron
    from spark_megatron.checkpoint.launcher import run_cli

    a = build_parser().parse_args(argv)

    def done():
        if os.environ.get("RANK", "0") == "0":
            print(f"wrote {a.out} (TP {a.tp}, PP {a.pp})")

    return run_cli(convert_hf_to_megatron, a.hf, a.out, tp=a.tp, pp=a.pp, dtype=a.dtype, force=a.force,
                   progress=not a.no_progress, timeout_s=a.timeout, vocab_divisible_by=a.make_vocab_size_divisible_by,
                   out=a.out, on_success=done)


if __name__ == "__main__":
    sys.exit(main())
