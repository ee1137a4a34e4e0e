"""`spark-megatron train --config RECIPE [key=value ...]`: run SPARK on Megatron actors with vLLM rollouts.

Under torchrun (WORLD_SIZE set) every process runs the controller SPMD; the world must be TP x PP x DP
(parallel.data_parallel_size). Started directly, it spawns TP x PP x DP gloo ranks itself on CPU (or runs
in-process for a 1-rank layout), so the quickstart needs no launcher. Every rank hosts its part of a rollout
engine (rollout.tensor_parallel_size consecutive ranks per engine, see spark_megatron/rollout/layout.py).

Before any rank starts, launch/preflight.py checks the config, paths, output_dir and data; a problem there, or a
configuration, data or checkpoint error in a rank, prints one `error: ...` line and exits 2 (the rank's traceback
is in <output_dir>/logs/rank<N>.log). A run that stops itself after too many bad updates exits 3; a dead or hung
rollout engine (or rank) ends the job with one line naming it and exits 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from spark_megatron.config import ConfigError, RunConfig, load_config, save_config

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spark-megatron train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  spark-megatron train --config configs/tiny_cpu.yaml output_dir=runs/demo\n"
               "  spark-megatron train --config configs/tiny_cpu.yaml parallel.tensor_model_parallel_size=2 "
               "total_steps=5\n  spark-megatron train --config configs/tiny_cpu.yaml output_dir=runs/demo --resume")
    p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest complete "
                   "checkpoint (one that does not load is skipped for the one before it)")
    p.add_argument("--force", action="store_true", help="output_dir holds a run: delete it (run.json, config.yaml, "
                   "metrics.jsonl, checkpoints/, warmup_model/, tensorboard/, wandb/, logs/; nothing else) and start "
                   "over")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted-key overrides, e.g. optim.lr=1e-6 rollout.n=4")
    return p


def resolve_config(argv) -> tuple:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg.checkpoint.resume = True
    return args, cfg


TINY_KINDS = ("qwen2", "qwen2-tied", "qwen2_5_vl")


def write_tiny(kind: str, out, seed: int) -> None:
    """A seeded random tiny checkpoint of one of TINY_KINDS, built locally."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-file tiny checkpoint needs no "Writing model shards" bar
    if kind == "qwen2_5_vl":
        from spark_megatron.models.tiny_vl_checkpoint import TinyQwen25VLSpec, write_tiny_qwen2_5_vl

        write_tiny_qwen2_5_vl(out, TinyQwen25VLSpec(seed=seed))
        return
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2

    write_tiny_qwen2(out, TinyQwen2Spec(tie_word_embeddings=kind.endswith("tied"), seed=seed))


def prepare_model_dir(cfg: RunConfig) -> str:
    """`tiny:qwen2` recipes build their random tiny model into the run directory (no downloads)."""
    path = cfg.model.hf_path
    if not path.startswith("tiny:"):
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.hf_path '{path}' is not an HF checkpoint directory (no config.json)")
        return path
    from spark_megatron.checkpoint.atomic import OutputExistsError, atomic_output_dir

    out = Path(cfg.output_dir) / "tiny_model"
    kind = path.split(":", 1)[1]
    if kind not in TINY_KINDS:
        raise ConfigError(f"model.hf_path '{path}': tiny models are " + ", ".join(f"tiny:{k}" for k in TINY_KINDS))
    marker = {"kind": kind, "seed": cfg.seed}
    if _tiny_marker(out) == marker:
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # under torchrun every rank gets here at once: each writes the same (seeded) model into its own temp dir,
    # the first rename publishes it and the others find it in place. A model of another kind or seed is replaced.
    try:
        with atomic_output_dir(out, force=out.exists()) as tmp:
            write_tiny(kind, tmp, cfg.seed)
            (tmp / TINY_MARKER).write_text(json.dumps(marker) + "\n")
    except (OutputExistsError, OSError):
        if _tiny_marker(out) != marker:
            raise
    return str(out)


TINY_MARKER = "tiny_kind.json"
"""Kind and seed of a tiny model built into output_dir/tiny_model (a cache: rebuilt when they change)."""


def _tiny_marker(out: Path):
    try:
        return json.loads((out / TINY_MARKER).read_text())
    except (OSError, ValueError):
        return None


def check_engine_for_model(cfg: RunConfig, hf_dir: str) -> None:
    """vLLM's Qwen2.5-VL imports torchvision, which PyPI ships only CUDA-built: on a CPU machine it cannot load,
    so say so before any rank starts (and before vLLM fails deep inside its model registry)."""
    import json

    import torch

    model_type = json.loads((Path(hf_dir) / "config.json").read_text()).get("model_type")
    if model_type == "qwen2_5_vl" and cfg.rollout.engine == "vllm" and not torch.cuda.is_available():
        raise ConfigError("rollout.engine=vllm cannot serve Qwen2.5-VL on a CPU machine (vLLM's Qwen2.5-VL needs "
                          "a CUDA torchvision); use rollout.engine=hf for CPU runs of VL models")


def rank_main(rank: int, world: int, cfg_dict: dict, hf_dir: str) -> dict:
    """Body of one rank: init parallel state, run the trainer, return the last metrics row. The rank's log (all
    libraries; rank 0 also shows its part on the console, see logs.py) and a failure's traceback go to
    <output_dir>/logs/rank<N>.log; an error the user can act on is re-raised as a one-line RunAbort."""
    from spark_megatron import logs
    from spark_megatron.config import build_dataclass

    cfg = build_dataclass(RunConfig, cfg_dict)
    log_path = Path(cfg.output_dir) / "logs" / f"rank{rank}.log"
    with logs.rank_logging(rank, log_path):
        try:
            return _train(cfg, hf_dir)
        except BaseException as e:
            with open(log_path, "a") as f:
                f.write(traceback.format_exc())
            abort = _as_abort(e)
            if abort is not None:
                raise abort from None
            raise


def _train(cfg: RunConfig, hf_dir: str) -> dict:
    from spark_megatron.controller import SparkTrainer
    from spark_megatron.parallel.groups import init_distributed

    init_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                     cfg.parallel.virtual_pipeline_model_parallel_size, seed=cfg.seed)
    trainer = SparkTrainer(cfg, hf_dir)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def _user_error_types() -> tuple:
    """Errors that mean bad configuration, data or checkpoints (one line for the user), of the modules loaded so
    far: checking for one must not import torch."""
    from spark_megatron.data.records import DataError
    from spark_megatron.launch.validation import RecipeError

    kinds = [ConfigError, DataError, RecipeError]
    weights = sys.modules.get("spark_megatron.models.weights")
    if weights is not None:
        kinds.append(weights.CheckpointError)
    return tuple(kinds)


def _as_abort(e: BaseException):
    from spark_megatron.launch.preflight import EXIT_STOPPED, RunAbort

    if isinstance(e, RunAbort):
        return e
    stopped = sys.modules.get("spark_megatron.run_state")
    if stopped is not None and isinstance(e, stopped.TrainingStopped):
        return RunAbort(str(e), EXIT_STOPPED)
    if isinstance(e, _user_error_types()):
        return RunAbort(_one_line(e))
    return None


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def spawned_world(cfg: RunConfig) -> int:
    """Ranks of this job, TP x PP x DP (parallel.data_parallel_size); under torchrun the started world must be
    exactly that, and the rollout layout must be buildable on it. ConfigError (one line) otherwise, before any
    rank starts (torch-free: preflight answers before heavy imports)."""
    from spark_megatron.rollout.layout import LayoutError, layout_for_config

    par = cfg.parallel
    world = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.data_parallel_size
    started = os.environ.get("WORLD_SIZE")
    if started is not None and int(started) != world:
        grid = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
        hint = f"set parallel.data_parallel_size={int(started) // grid}" if int(started) % grid == 0 else \
            f"start a multiple of TP x PP = {grid} ranks"
        raise ConfigError(f"torchrun started {started} ranks but parallel.tensor_model_parallel_size "
                          f"{par.tensor_model_parallel_size} x pipeline_model_parallel_size "
                          f"{par.pipeline_model_parallel_size} x data_parallel_size {par.data_parallel_size} = "
                          f"{world}; {hint}")
    if cfg.launch.rollout_gpus:
        raise ConfigError(f"launch.rollout_gpus {cfg.launch.rollout_gpus}: dedicated rollout GPUs are not built "
                          "(engines run colocated on every rank); set launch.rollout_gpus=0")
    try:  # the sleep assumption (GPU or not) does not change whether a layout can be built
        layout_for_config(cfg, world, on_gpu=False)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    return world


def preflight(args, cfg: RunConfig) -> str:
    """Every check that needs no model built (launch/preflight.py), then claim output_dir; returns hf_dir."""
    from spark_megatron.launch import preflight as checks
    from spark_megatron.run_dir import claim, remove_run

    owner = int(os.environ.get("RANK", 0)) == 0  # under torchrun, rank 0 alone decides about output_dir
    resume, world = cfg.checkpoint.resume, spawned_world(cfg)
    loaded = checks.check_before_model(cfg, world, resume, args.force, owner)
    hf_dir = prepare_model_dir(cfg)
    check_engine_for_model(cfg, hf_dir)
    lengths = checks.check_with_model(cfg, world, hf_dir, loaded, resume)
    if owner and (loaded.report.skipped or lengths.dropped):
        log.warning(f"[preflight] {len(lengths.kept)} prompts; {loaded.report.skipped} bad records skipped "
                    f"(data.on_bad_record=skip); {lengths.summary()}")
    if owner:
        if args.force:
            removed = remove_run(cfg.output_dir)
            if removed:
                log.info(f"--force: removed {', '.join(p.name for p in removed)} from {cfg.output_dir}")
        claim(cfg.output_dir, resume)
        (Path(cfg.output_dir) / "logs").mkdir(exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    return hf_dir


def main(argv=None) -> int:
    from spark_megatron import logs

    logs.configure(console=True)  # this process's lines (preflight, --force) on the console; ranks log to files
    try:
        return _main(argv if argv is not None else sys.argv[1:])
    finally:
        logs.undo()


def _main(argv: list) -> int:
    try:
        args, cfg = resolve_config(argv)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
            return 0
        hf_dir = preflight(args, cfg)
    except Exception as e:  # noqa: BLE001 - user errors become one line, anything else keeps its traceback
        if not isinstance(e, _user_error_types()):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    from spark_megatron.launch.preflight import RunAbort
    from spark_megatron.parallel.spawn import RankFailure
    from spark_megatron.rollout.watch import EngineFailure

    try:
        _run_ranks(cfg, hf_dir)
    except KeyboardInterrupt:
        print(f"interrupted: {_resume_hint(cfg)}", file=sys.stderr)
        return 130
    except RunAbort as e:
        print(f"error: {e.user_message}", file=sys.stderr)
        return e.exit_code
    except RankFailure as e:
        if e.summary is None:
            raise
        failure_log = Path(cfg.output_dir) / "logs" / "rank_failure.log"
        failure_log.parent.mkdir(parents=True, exist_ok=True)
        failure_log.write_text(str(e))
        print(f"error: {e.summary} (rank output: {failure_log})", file=sys.stderr)
        return e.exit_code or 1
    except EngineFailure as e:  # world of one: the engine failed in this process
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: metrics in {Path(cfg.output_dir) / 'metrics.jsonl'}")
    return 0


def _resume_hint(cfg: RunConfig) -> str:
    """Where an interrupted run stands: its newest complete checkpoint, and how to continue from it."""
    from spark_megatron.checkpoint.train_state import checkpoint_run_id, complete_checkpoints
    from spark_megatron.run_dir import read_run_id

    run_id = read_run_id(cfg.output_dir)
    done = [p for p in complete_checkpoints(Path(cfg.output_dir) / "checkpoints") if checkpoint_run_id(p) == run_id]
    if not done:
        return f"no checkpoint of this run was written yet; rerun with --force to start over in {cfg.output_dir}"
    return f"newest complete checkpoint {done[-1]}; rerun the same command with --resume to continue from it"


def _run_ranks(cfg: RunConfig, hf_dir: str) -> None:
    world = spawned_world(cfg)
    cfg_dict = dataclasses.asdict(cfg)
    if "WORLD_SIZE" in os.environ:  # torchrun / srun: this process is one rank
        rank_main(int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]), cfg_dict, hf_dir)
    elif world == 1:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        from spark_megatron.parallel.spawn import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        rank_main(0, 1, cfg_dict, hf_dir)
    else:
        from spark_megatron.parallel.spawn import run_on_ranks

        run_on_ranks(rank_main, world, cfg_dict, hf_dir, timeout_s=24 * 3600)


if __name__ == "__main__":
    sys.exit(main())
