"""`spark-megatron train --config RECIPE [key=value ...]`: run SPARK on Megatron actors with vLLM rollouts.

Under torchrun (WORLD_SIZE set) every process runs the controller SPMD; the world must be TP x PP x DP
(parallel.data_parallel_size). Started directly, it spawns TP x PP x DP gloo ranks itself on CPU (or runs
in-process for a 1-rank layout), so the quickstart needs no launcher. Every rank hosts its part of a rollout
engine (rollout.tensor_parallel_size consecutive ranks per engine, see spark_megatron/rollout/layout.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from spark_megatron.config import ConfigError, RunConfig, load_config, save_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spark-megatron train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  spark-megatron train --config configs/tiny_cpu.yaml output_dir=runs/demo\n"
               "  spark-megatron train --config configs/tiny_cpu.yaml parallel.tensor_model_parallel_size=2 "
               "total_steps=5\n  spark-megatron train --config configs/tiny_cpu.yaml output_dir=runs/demo --resume")
    p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in output_dir")
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
    if (out / "config.json").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # under torchrun every rank gets here at once: each writes the same (seeded) model into its own temp dir,
    # the first rename publishes it and the others find it in place
    try:
        with atomic_output_dir(out) as tmp:
            write_tiny(kind, tmp, cfg.seed)
    except OutputExistsError:
        if not (out / "config.json").is_file():
            raise
    return str(out)


def check_engine_for_model(cfg: RunConfig, hf_dir: str) -> None:
    """vLLM's Qwen2.5-VL imports torchvision, which PyPI ships only CUDA-built: on a CPU machine it cannot load,
    so say so before any rank starts (and before vLLM fails deep inside its model registry)."""
    import json

    import torch

    model_type = json.loads((Path(hf_dir) / "config.json").read_text()).get("model_type")
    if model_type == "qwen2_5_vl" and cfg.rollout.engine == "vllm" and not torch.cuda.is_available():
        raise ConfigError("rollout.engine=vllm cannot serve Qwen2.5-VL on a CPU machine (vLLM's Qwen2.5-VL needs "
                          "a CUDA torchvision); use rollout.engine=hf for CPU runs of VL models")


def job_world(cfg: RunConfig) -> int:
    """TP x PP x DP ranks; under torchrun the started world must be exactly that; the rollout layout must be
    buildable on it. ConfigError (one line) otherwise, before any rank starts."""
    import torch

    from spark_megatron.rollout.layout import LayoutError, layout_for_config

    par = cfg.parallel
    if min(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.data_parallel_size) < 1:
        raise ConfigError("parallel.tensor_model_parallel_size, pipeline_model_parallel_size and "
                          "data_parallel_size must be >= 1")
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
    try:
        layout_for_config(cfg, world, on_gpu=torch.cuda.is_available())
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    return world


def rank_main(rank: int, world: int, cfg_dict: dict, hf_dir: str) -> dict:
    """Body of one rank: init parallel state, run the trainer, return the last metrics row."""
    from spark_megatron.config import _build
    from spark_megatron.controller import SparkTrainer
    from spark_megatron.parallel.groups import init_distributed

    cfg = _build(RunConfig, cfg_dict)
    init_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                     cfg.parallel.virtual_pipeline_model_parallel_size, seed=cfg.seed)
    trainer = SparkTrainer(cfg, hf_dir)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def main(argv=None) -> int:
    try:
        args, cfg = resolve_config(argv if argv is not None else sys.argv[1:])
        if args.print_config:
            import yaml

            print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
            return 0
        world = job_world(cfg)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        hf_dir = prepare_model_dir(cfg)
        check_engine_for_model(cfg, hf_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    cfg_dict = dataclasses.asdict(cfg)
    if "WORLD_SIZE" in os.environ:  # torchrun / srun: this process is one rank
        rank_main(int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]), cfg_dict, hf_dir)
    elif world == 1:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        from spark_megatron.parallel.spawn import free_port
        from spark_megatron.rollout.watch import EngineFailure

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        try:
            rank_main(0, 1, cfg_dict, hf_dir)
        except EngineFailure as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        from spark_megatron.parallel.spawn import RankFailure, run_on_ranks

        try:
            run_on_ranks(rank_main, world, cfg_dict, hf_dir, timeout_s=24 * 3600)
        except RankFailure as e:
            if not e.summary:
                raise
            log = Path(cfg.output_dir) / "rank_failure.log"
            log.write_text(str(e))
            print(f"error: {e.summary} (rank output: {log})", file=sys.stderr)
            return 1
    print(f"done: metrics in {Path(cfg.output_dir) / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
