"""`spark-megatron launch-eval`: `spark-megatron eval` as a NeMo-Run job, on the executors training uses.

    spark-megatron launch-eval --config configs/qwen2_5_vl_7b.yaml --executor slurm --dryrun \\
        --model /ckpt/run1 --suite configs/eval/spark_vl.yaml --output /lustre/eval/run1 --self-reflection

The recipe supplies the cluster settings (launch.*: account, partition, container, mounts, env); the job runs on
one node, torchrun with one rank per GPU (launch.gpus_per_node ranks): engine.tensor_parallel_size consecutive
ranks per vLLM engine and gpus_per_node / engine.tensor_parallel_size engines (engine.data_parallel_size, set in
the shipped suite), which split every batch; rank 0 writes the results (spark_megatron/eval/ranks.py). The
suite, resolved on this machine (overrides applied, dataset paths absolute), is embedded in the sbatch script the
same way the training recipe is, so the job reads exactly what was validated here. Model, data and output paths
must be visible on the cluster (launch.container_mounts; the output directory is mounted automatically).
"""
from __future__ import annotations

import argparse
import sys

import yaml

EVAL_MODULE = "spark_megatron.launch.eval_entry"
SUITE_NAME = "eval_suite.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spark-megatron launch-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training recipe whose launch.* settings the job uses")
    p.add_argument("--executor", choices=["local", "slurm"], default=None, help="override launch.executor")
    p.add_argument("--dryrun", action="store_true", help="render the job files, do not submit")
    p.add_argument("--model", required=True, help="HF dir, Megatron checkpoint or run dir (as the cluster sees it)")
    p.add_argument("--suite", required=True, help="suite YAML (validated here, shipped inside the job)")
    p.add_argument("--output", required=True, help="evaluation output directory (as the cluster sees it)")
    p.add_argument("--self-reflection", action="store_true", help="evaluate with test-time self-reflection")
    p.add_argument("--force", action="store_true", help="replace another evaluation's results in --output")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="suite override (repeatable), e.g. --set engine.tensor_parallel_size=4")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. launch.account=proj launch.time_limit=02:00:00")
    return p


def eval_job(cfg, suite, args):
    """The JobSpec and recipe adjustments of an evaluation job."""
    from spark_megatron.launch.executors import JobSpec
    from spark_megatron.launch.validation import RecipeError

    lc = cfg.launch
    eng = suite.engine
    gpus, tp = lc.gpus_per_node, eng.tensor_parallel_size
    if tp > gpus or gpus % tp:
        raise RecipeError(f"engine.tensor_parallel_size {tp} does not divide launch.gpus_per_node {gpus} (an "
                          f"evaluation job runs one rank per GPU of one node)")
    if eng.data_parallel_size not in (1, gpus // tp):
        raise RecipeError(f"engine.data_parallel_size {eng.data_parallel_size} x engine.tensor_parallel_size {tp} "
                          f"!= launch.gpus_per_node {gpus}: the job uses every GPU of its node (leave "
                          f"engine.data_parallel_size at 1 to have it set to {gpus // tp})")
    from spark_megatron.rollout.layout import rollout_layout

    # the layout the job's ranks will build (eval/generation.py::eval_layout): one function for train and eval
    layout = rollout_layout(gpus, 1, 1, tp, on_gpu=True, engine="hf" if eng.engine == "hf" else "vllm",
                            gpus_per_node=gpus)
    eng.data_parallel_size = layout.engines
    lc.nodes = 1
    lc.job_name = f"{lc.job_name}-eval"
    cfg.output_dir = args.output  # mounted into the container; artifacts under <output>/launch/
    extra = ["--model", args.model, "--output", args.output, "--no-progress"]
    extra += ["--force"] if args.force else []
    return JobSpec(task="eval", module=EVAL_MODULE, config_flag="--suite", config_name=SUITE_NAME,
                   config_yaml=yaml.safe_dump(suite.to_dict(), sort_keys=False), extra_args=tuple(extra),
                   ntasks_per_node=gpus)


def main(argv=None) -> int:
    from spark_megatron.config import ConfigError, load_config
    from spark_megatron.eval.suite import load_suite
    from spark_megatron.launch.executors import LaunchError, launch
    from spark_megatron.launch.validation import RecipeError

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.executor:
            cfg.launch.executor = args.executor
        if cfg.launch.executor == "slurm" and not cfg.launch.account:
            raise RecipeError("launch.executor=slurm needs launch.account")
        suite = load_suite(args.suite, args.set)
        if args.self_reflection:
            suite.self_reflection.enabled = True
        out = launch(cfg, dryrun=args.dryrun, job=eval_job(cfg, suite, args))
    except (ConfigError, RecipeError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"experiment     {out.experiment_id} ({out.experiment_dir})")
    print(f"suite          {out.artifacts_dir / SUITE_NAME}")
    print(f"engines        {suite.engine.data_parallel_size} x TP {suite.engine.tensor_parallel_size}, one rank "
          f"per GPU ({cfg.launch.gpus_per_node} ranks)")
    if out.sbatch_script:
        print(f"sbatch script  {out.sbatch_script}")
    print(f"torchrun       {out.command_file}")
    print(("submitted" if out.submitted else "dry run: nothing submitted") + f"; command: {out.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
