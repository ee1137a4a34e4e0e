"""`spark-megatron`: one entry point for training, planning, launching, plotting and checkpoint conversion.

    spark-megatron train   --config RECIPE [key=value ...]     run SPARK here (torchrun / spawned CPU ranks)
    spark-megatron eval    --model DIR --suite S --output OUT   the paper's evaluation of any checkpoint
    spark-megatron plan    --config RECIPE [key=value ...]     validate the layout, print the per-GPU memory plan
    spark-megatron launch  --config RECIPE --executor slurm    NeMo-Run experiment (local torchrun or Slurm)
    spark-megatron launch-eval --config RECIPE --model ...     the evaluation as a NeMo-Run job (same executors)
    spark-megatron plot    RUN_DIR ...                         training curves from metrics.jsonl
    spark-megatron convert hf-to-megatron|megatron-to-hf|compare ...   checkpoint conversion (repo's conversion/)

Run `spark-megatron <command> --help` for the options of each.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Optional

from spark_megatron.config import ConfigError, check_values, load_config

FORWARDED = {"train": "spark_megatron.launch.train_entry", "plot": "spark_megatron.plots",
             "eval": "spark_megatron.launch.eval_entry", "launch-eval": "spark_megatron.launch.eval_launch"}
CONVERTERS = {"hf-to-megatron": "hf_to_megatron", "megatron-to-hf": "megatron_to_hf", "compare": "compare"}


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("--model-config", default=None,
                   help="HF config.json (or checkpoint dir) to plan with when model.hf_path is not readable "
                        "here, e.g. configs/models/qwen2_5_vl_32b_instruct.json (default: launch.model_config)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="device memory per GPU in GiB (default: the recipe's launch.gpu_memory_gib, 80)")
    p.add_argument("--overhead-gib", type=float, default=4.0,
                   help="per-GPU reserve for CUDA context, NCCL buffers and fragmentation (default 4)")
    p.add_argument("--layer-spec", choices=["auto", "te", "local"], default="auto",
                   help="te: flash attention; local: the CPU spec, s^2 attention scores (default: auto)")
    p.add_argument("overrides", nargs="*", help="dotted-key overrides, e.g. parallel.tensor_model_parallel_size=8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spark-megatron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("train", help="run SPARK training (forwards to spark_megatron.launch.train_entry)",
                   add_help=False)
    sub.add_parser("plot", help="plot training curves (forwards to spark_megatron.plots)", add_help=False)
    sub.add_parser("eval", help="evaluate a checkpoint on a benchmark suite (forwards to "
                                "spark_megatron.launch.eval_entry)", add_help=False)
    sub.add_parser("launch-eval", help="submit `spark-megatron eval` as a NeMo-Run job (local or Slurm)",
                   add_help=False)
    sub.add_parser("convert", help="checkpoint conversion: hf-to-megatron | megatron-to-hf | compare",
                   add_help=False)
    plan = sub.add_parser("plan", help="validate a recipe and print its per-GPU memory plan",
                          description="Validate divisibility (heads, KV groups, layers, vocab, world size vs "
                                      "TP x PP x DP, rollout TP) and print the per-GPU memory budget. Exits 1 "
                                      "when the recipe is invalid or does not fit the device memory.")
    _plan_args(plan)
    plan.add_argument("--json", default=None, help="also write the report as JSON to this file")
    launch = sub.add_parser("launch", help="build a NeMo-Run experiment (local torchrun or Slurm) and submit it",
                            description="Validate and plan the recipe, then run it through NeMo-Run: "
                                        "run.LocalExecutor (one node) or run.SlurmExecutor (Pyxis container), "
                                        "torchrun launcher. --dryrun writes the sbatch script and the torchrun "
                                        "command into <output_dir>/launch/<experiment id>/ without submitting.")
    _plan_args(launch)
    launch.add_argument("--executor", choices=["local", "slurm"], default=None,
                        help="override launch.executor of the recipe")
    launch.add_argument("--dryrun", action="store_true", help="render the job files, do not submit")
    launch.add_argument("--no-memory-check", action="store_true",
                        help="submit even when the planner says the recipe does not fit (layout checks still run)")
    return parser


def _load(args):
    from spark_megatron.launch.planner import PlanOptions
    from spark_megatron.launch.validation import resolve_architecture

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "executor", None):
        cfg.launch.executor = args.executor
    check_values(cfg)  # the value rules `train` applies, so a plan is never made for a recipe that cannot run
    arch = resolve_architecture(cfg, args.model_config)
    opts = PlanOptions(gpu_memory_gib=args.gpu_memory_gib, overhead_gib=args.overhead_gib,
                       layer_spec=args.layer_spec)
    return cfg, arch, opts


def cmd_plan(args) -> int:
    import dataclasses
    import json

    from spark_megatron.launch.planner import check_fits, plan
    from spark_megatron.launch.report import format_report

    cfg, arch, opts = _load(args)
    report = plan(cfg, arch, opts)
    print(format_report(report))
    if args.json:
        data = dataclasses.asdict(report) | {"peak_bytes": report.peak_bytes, "fits": report.fits}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    check_fits(report)
    return 0


def cmd_launch(args) -> int:
    from spark_megatron.launch.executors import launch
    from spark_megatron.launch.planner import check_fits, plan
    from spark_megatron.launch.report import format_report

    cfg, arch, opts = _load(args)
    report = plan(cfg, arch, opts, launching=True)  # RecipeError before anything is written or submitted
    if not args.no_memory_check:
        check_fits(report)
    out = launch(cfg, dryrun=args.dryrun)
    (out.artifacts_dir / "plan.txt").write_text(format_report(report) + "\n")
    print(f"experiment     {out.experiment_id} ({out.experiment_dir})")
    print(f"recipe         {out.resolved_config}")
    if out.sbatch_script:
        print(f"sbatch script  {out.sbatch_script}")
    print(f"torchrun       {out.command_file}")
    print(f"memory plan    {out.artifacts_dir / 'plan.txt'}")
    print(f"engines        {report.layout.rollout.describe()}")
    print(("submitted" if out.submitted else "dry run: nothing submitted") + f"; command: {out.command}")
    return 0


def _forward(command: str, rest: list) -> int:
    if command == "convert":
        return _convert(rest)
    module = importlib.import_module(FORWARDED[command])
    return int(module.main(rest) or 0)


def _convert(rest: list) -> int:
    from spark_megatron.launch.validation import REPO_ROOT

    if not rest or rest[0] not in CONVERTERS:
        print("usage: spark-megatron convert {" + "|".join(CONVERTERS) + "} [args ...] (--help after the "
              "subcommand for its options)", file=sys.stderr)
        return 2
    path = REPO_ROOT / "conversion" / f"{CONVERTERS[rest[0]]}.py"
    if not path.is_file():
        print(f"error: conversion scripts live in the repository checkout; {path} not found", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(f"conversion_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved, sys.argv = sys.argv, [f"spark-megatron convert {rest[0]}", *rest[1:]]  # argparse's prog name
    try:
        return int(module.main(rest[1:]) or 0)
    finally:
        sys.argv = saved


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in (*FORWARDED, "convert"):
        return _forward(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from spark_megatron.launch.executors import LaunchError
    from spark_megatron.launch.validation import RecipeError

    try:
        return cmd_plan(args) if args.command == "plan" else cmd_launch(args)
    except ConfigError as e:  # already names the recipe file
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RecipeError, LaunchError) as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
