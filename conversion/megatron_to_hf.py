"""Export a Megatron checkpoint (saved at any TP/PP) to an HF directory that `from_pretrained` and vLLM load.

    python conversion/megatron_to_hf.py --megatron ./qwen7b-tp2pp2 --out ./qwen7b-hf

The checkpoint is loaded at the export layout --tp x --pp (default 1 x 1; more ranks = less memory per rank);
each pipeline stage streams its tensors into size-limited safetensors shards. Without torchrun, the ranks are
spawned gloo processes on this machine.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron", required=True, help="Megatron checkpoint dir (with spark_meta.json)")
    p.add_argument("--out", required=True, help="output HF dir (must not exist or be empty)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size used for the export (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used for the export (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written tensors (default: the stored HF config's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="max bytes per safetensors file, e.g. 5GB, 500MB")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before spawned ranks are abandoned")
    return p


def _export(a) -> None:
    from spark_megatron.checkpoint.hf_export import export_megatron_to_hf
    from spark_megatron.checkpoint.launcher import parse_size

    export_megatron_to_hf(a.megatron, a.out, tp=a.tp, pp=a.pp, dtype=a.dtype,
                          max_shard_bytes=parse_size(a.max_shard_size), force=a.force,
                          progress=not a.no_progress, timeout_s=a.timeout)


def main(argv=None) -> int:
    from spark_megatron.checkpoint.launcher import run_cli

    a = build_parser().parse_args(argv)
    rc = run_cli(_export, a)
    if rc == 0 and os.environ.get("RANK", "0") == "0":
        print(f"wrote {a.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
