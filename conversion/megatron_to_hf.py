"""Export a Megatron checkpoint (saved at any TP/PP) to an HF directory that `from_pretrained` and vLLM load.

    python conversion/megatron_to_hf.py --megatron ./qwen7b-tp2pp2 --out ./qwen7b-hf

Nothing is loaded into a model: --workers processes each write their share of the size-limited safetensors files,
streaming one parameter at a time out of the dist-checkpoint files (memory per worker: about the largest
parameter). Tensor names follow the scheme of the HF checkpoint the Megatron one was converted from (recorded in
it; Qwen2.5-VL: 'hub' = visual.* / model.*, 'transformers' = model.visual.* / model.language_model.*), or
--hf-naming. Without torchrun the workers are spawned gloo processes on this machine.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron", required=True, help="Megatron checkpoint dir (with spark_meta.json)")
    p.add_argument("--out", required=True, help="output HF dir (must not exist or be empty)")
    p.add_argument("--workers", type=int, default=1, help="processes writing the HF files (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written tensors (default: the stored HF config's dtype)")
    p.add_argument("--hf-naming", choices=["hub", "transformers"], default=None,
                   help="tensor names to write (default: those of the checkpoint converted from, else hub)")
    p.add_argument("--max-shard-size", default="5GB", help="max bytes per safetensors file, e.g. 5GB, 500MB")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before spawned workers are abandoned")
    return p


def _export(a) -> None:
    from spark_megatron.checkpoint.hf_export import export_megatron_to_hf
    from spark_megatron.checkpoint.launcher import parse_size

    export_megatron_to_hf(a.megatron, a.out, workers=a.workers, dtype=a.dtype,
                          max_shard_bytes=parse_size(a.max_shard_size), hf_naming=a.hf_naming, force=a.force,
                          progress=not a.no_progress, timeout_s=a.timeout)


def main(argv=None) -> int:
    from spark_megatron.checkpoint.launcher import run_cli

    a = build_parser().parse_args(argv)

    def done():
        if os.environ.get("RANK", "0") == "0":
            print(f"wrote {a.out}")

    return run_cli(_export, a, out=a.out, on_success=done)


if __name__ == "__main__":
    sys.exit(main())
