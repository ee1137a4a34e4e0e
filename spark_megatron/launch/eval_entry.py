"""`spark-megatron eval --model DIR --suite SUITE.yaml --output OUT [--self-reflection] [key=value ...]`

Evaluates a checkpoint the way the SPARK paper does: per-benchmark accuracy of the boxed answer (greedy, the
reference's max tokens and repetition penalty, the training verifier), reward-benchmark accuracy with the
training's judge prompts, macro averages (Avg-M, Avg-R, Avg-All) and, with --self-reflection, first-attempt and
final accuracy of the judge-then-retry loop. DIR: an HF checkpoint, a Megatron checkpoint (exported on the fly)
or a training run directory (its newest complete checkpoint).

Writes OUT/items.jsonl (one row per item), OUT/summary.json, OUT/table.md. Re-running with the same OUT
continues where a killed run stopped; a different suite or model in OUT is refused unless --force.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spark-megatron eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  spark-megatron eval --model runs/quickstart --suite configs/eval/tiny_arith.yaml "
               "--output runs/quickstart/eval\n  spark-megatron eval --model /models/Spark-VL-7B --suite "
               "configs/eval/spark_vl.yaml --output eval/spark-vl-7b --self-reflection engine.tensor_parallel_size=4")
    p.add_argument("--model", required=True, help="HF dir, Megatron checkpoint dir, or training run dir")
    p.add_argument("--suite", required=True, help="suite YAML (see configs/eval/)")
    p.add_argument("--output", required=True, help="output directory (resumable)")
    p.add_argument("--self-reflection", action="store_true",
                   help="answer -> self-judge -> retry (at most self_reflection.max_rounds, default 2)")
    p.add_argument("--force", action="store_true", help="replace the results of another suite/model in --output")
    p.add_argument("--export-workers", type=int, default=1,
                   help="processes of the on-the-fly Megatron -> HF export (each writes its share of the HF files)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="suite overrides, e.g. decoding.max_tokens=512 "
                                                "datasets.MathVista.limit=100")
    return p


def _user_error(e: Exception) -> bool:
    """Bad input (suite, data, model, OUT) rather than a bug. Checkpoint errors are looked up only here: their
    module imports torch, which a mistyped flag should not wait for."""
    from spark_megatron.config import ConfigError
    from spark_megatron.data.records import DataError
    from spark_megatron.eval.model import ModelError
    from spark_megatron.eval.output import EvalStateError

    if isinstance(e, (ConfigError, DataError, ModelError, EvalStateError)):
        return True
    if "spark_megatron.checkpoint.launcher" in sys.modules:
        return isinstance(e, sys.modules["spark_megatron.checkpoint.launcher"].USER_ERRORS)
    return False


def main(argv=None) -> int:
    from spark_megatron.eval.suite import load_suite

    args = build_parser().parse_args(argv)
    try:
        suite = load_suite(args.suite, args.overrides)
        if args.self_reflection:
            suite.self_reflection.enabled = True
        from spark_megatron.eval.evaluate import evaluate

        summary = evaluate(args.model, suite, args.output, force=args.force, progress=not args.no_progress,
                           export_workers=args.export_workers)
    except Exception as e:
        if not _user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    print((Path(args.output) / "table.md").read_text(), end="")
    avg = summary["averages"]
    print("averages: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in avg.items() if v is not None))
    print(f"wrote {Path(args.output) / 'items.jsonl'}, summary.json, table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
