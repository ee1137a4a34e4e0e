"""`spark-megatron eval --model DIR --suite SUITE.yaml --output OUT [--self-reflection] [key=value ...]`

Evaluates a checkpoint the way the SPARK paper does: per-benchmark accuracy of the boxed answer (greedy, the
reference's max tokens and repetition penalty, the training verifier), reward-benchmark accuracy with the
training's judge prompts, macro averages (Avg-M, Avg-R, Avg-All) and, with --self-reflection, first-attempt and
final accuracy of the judge-then-retry loop. DIR: an HF checkpoint, a Megatron checkpoint (exported on the fly)
or a training run directory (its newest complete checkpoint).

Writes OUT/items.jsonl (one row per item), OUT/summary.json, OUT/table.md, and each rank's log (vLLM's lines
included) to OUT/logs/rank<N>.log. Re-running with the same OUT
continues where a killed run stopped; a different suite or model in OUT is refused unless --force.

Several engines: engine.data_parallel_size engines of engine.tensor_parallel_size ranks each (the training's
rollout layout) split every batch; the job's ranks are spawned here (gloo on CPU), or under torchrun
(WORLD_SIZE set) this process is one of them. Rank 0 evaluates, the other ranks serve (eval/ranks.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spark-megatron eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  spark-megatron eval --model runs/quickstart --suite configs/eval/tiny_arith.yaml "
               "--output runs/quickstart/eval\n  spark-megatron eval --model /models/Spark-VL-7B --suite "
               "configs/eval/spark_vl.yaml --output eval/spark-vl-7b --self-reflection engine.tensor_parallel_size=4"
               "\n  torchrun --nproc-per-node 8 -m spark_megatron.launch.eval_entry --model /models/Spark-VL-7B "
               "--suite configs/eval/spark_vl.yaml --output eval/vl7b engine.tensor_parallel_size=2 "
               "engine.data_parallel_size=4")
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


def job_world(suite) -> int:
    """Ranks of the evaluation job: engine.data_parallel_size x engine.tensor_parallel_size. Under torchrun the
    started world must be exactly that (ConfigError, one line, with the value to set)."""
    from spark_megatron.config import ConfigError

    eng = suite.engine
    world = eng.data_parallel_size * eng.tensor_parallel_size
    started = os.environ.get("WORLD_SIZE")
    if started is not None and int(started) != world:
        hint = f"set engine.data_parallel_size={int(started) // eng.tensor_parallel_size}" \
            if int(started) % eng.tensor_parallel_size == 0 else \
            f"start a multiple of engine.tensor_parallel_size = {eng.tensor_parallel_size} ranks"
        raise ConfigError(f"torchrun started {started} ranks but engine.data_parallel_size {eng.data_parallel_size}"
                          f" x engine.tensor_parallel_size {eng.tensor_parallel_size} = {world}; {hint}")
    return world


def _load(args):
    from spark_megatron.eval.suite import load_suite

    suite = load_suite(args.suite, args.overrides)
    if args.self_reflection:
        suite.self_reflection.enabled = True
    return suite


def _evaluate(args, suite, **kwargs) -> dict:
    from spark_megatron.eval.evaluate import evaluate

    return evaluate(args.model, suite, args.output, force=args.force, progress=not args.no_progress,
                    export_workers=args.export_workers, **kwargs)


def _rank_logging(rank: int, output: str):
    """The trainer's logging for an evaluation rank (logs.py): vLLM's INFO lines and the known-harmless warnings
    go to OUT/logs/rank<N>.log, rank 0's console keeps the progress bar and our lines; other ranks write nothing
    to the console."""
    from spark_megatron import logs

    return logs.rank_logging(rank, Path(output) / "logs" / f"rank{rank}.log")


def rank_main(rank: int, world: int, args: argparse.Namespace, suite) -> dict:
    """One rank of an evaluation job: rank 0 evaluates over every rank's engine part, the others follow.
    `suite`: the resolved suite (rank 0 uses it). A user error on rank 0 stops the followers and leaves as one
    line (RunAbort)."""
    with _rank_logging(rank, args.output):
        return _rank_body(rank, args, suite)


def _rank_body(rank: int, args: argparse.Namespace, suite) -> dict:
    from spark_megatron.eval.ranks import FleetGenerator, follow, init_job
    from spark_megatron.launch.preflight import RunAbort

    control = init_job()
    if rank != 0:
        return {"engine": follow(control)}
    lead = FleetGenerator(control)
    try:
        summary = _evaluate(args, suite, in_job=True,
                            make_generator=lambda hf_dir: lead.generator(hf_dir, suite.engine, suite.decoding))
    except Exception as e:
        if not _user_error(e):
            raise
        raise RunAbort(_one_line(e)) from None
    finally:
        lead.close()
    return {"summary": summary, "engines": lead.reports}


def _one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run_job(args) -> Optional[dict]:
    """Evaluate as the arguments say -> rank 0's result ({"summary", "engines"}), None on ranks > 0."""
    suite = _load(args)  # every rank of a torchrun job: a bad suite or world fails alike, before any collective
    world = job_world(suite)
    if "WORLD_SIZE" in os.environ:  # torchrun / srun: this process is one rank of the job
        rank = int(os.environ.get("RANK", 0))
        result = rank_main(rank, world, args, suite)
        return result if rank == 0 else None
    if world == 1:
        with _rank_logging(0, args.output):
            return {"summary": _evaluate(args, suite), "engines": None}
    from spark_megatron.parallel.spawn import run_on_ranks

    return run_on_ranks(rank_main, world, args, suite, timeout_s=7 * 24 * 3600)[0]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_job(args)
    except Exception as e:
        message, code = _failure(e)
        if message is None:
            raise
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank fails alike: one line
            print(f"error: {message}", file=sys.stderr)
        return code
    if result is None:
        return 0
    print((Path(args.output) / "table.md").read_text(), end="")
    avg = result["summary"]["averages"]
    print("averages: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in avg.items() if v is not None))
    if result["engines"]:
        print(engines_line(result["engines"]))
    print(f"wrote {Path(args.output) / 'items.jsonl'}, summary.json, table.md")
    return 0


def engines_line(reports: list) -> str:
    """'engines: rollout engine 0 (rank 0) 17 prompts, rollout engine 1 (rank 1) 16 prompts (9 batches)'."""
    parts = [f"{r['label']} {r['prompts']} prompts" for r in reports]
    return f"engines: {', '.join(parts)} ({reports[0]['calls']} batches)"


def _failure(e: Exception) -> tuple:
    """(one line, exit code) for an error the user can act on: bad input (2), a failed or hung engine or rank
    (1); (None, None) for anything else (a bug keeps its traceback)."""
    if _user_error(e):
        return _one_line(e), 2
    message = getattr(e, "user_message", None)  # RunAbort of rank 0 (torchrun), RankFailure (spawned ranks)
    if message:
        return message, getattr(e, "exit_code", None) or 1
    if getattr(e, "one_line", False):  # EngineFailure in this process (torchrun)
        return str(e), 1
    return None, None


if __name__ == "__main__":
    sys.exit(main())
