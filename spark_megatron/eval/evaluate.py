"""`evaluate(model, suite, out)`: the whole evaluation of one checkpoint, resumable in `out`."""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from spark_megatron.eval.generation import EngineGenerator, build_eval_engine
from spark_megatron.eval.model import EXPORT_PREFIX, hf_directory, resolve_model
from spark_megatron.eval.output import OutputDir, path_fingerprint
from spark_megatron.eval.reading import load_dataset
from spark_megatron.eval.runner import Evaluation


def manifest_for(suite, source, data_hashes: dict) -> dict:
    return {"model": source.path, "model_kind": source.kind, "model_fingerprint": source.fingerprint(),
            "suite_fingerprint": suite.fingerprint(data_hashes), "suite": suite.to_dict(), "data": data_hashes,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def evaluate(model: str, suite, out, force: bool = False, progress: bool = True, export_workers: int = 1,
             make_generator: Optional[Callable] = None, log: Callable = print, in_job: bool = False) -> dict:
    """Score every item of `suite` not yet in `out`/items.jsonl; write summary.json and table.md; return the
    summary. `make_generator(hf_dir)` replaces the one in-process engine (a job's FleetGenerator, tests); the
    generator's `close()`, if any, runs when the evaluation ends. `in_job`: this process is rank 0 of a job of
    several ranks, so a Megatron checkpoint is exported under `out` (where every rank reads it) by a converter
    job of its own."""
    from spark_megatron.verify import Verifier

    source = resolve_model(model)
    outdir = OutputDir(out)
    data_hashes = {d.name: path_fingerprint(d.path) for d in suite.datasets}
    resumed = outdir.claim(manifest_for(suite, source, data_hashes), force)
    loaded = {d.name: load_dataset(d, suite, image_cache=str(Path(out) / "images")) for d in suite.datasets}
    for name, ld in loaded.items():
        r = ld.report
        if r.num_skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(r.skipped.items()))
            log(f"[data] {name}: {r.usable}/{r.records} records usable; skipped {r.num_skipped} ({reasons})")
            for e in r.examples:
                log(f"  {e}")
    if resumed:
        log(f"[resume] continuing the evaluation in {out}")
    with contextlib.ExitStack() as stack, Verifier(timeout_s=suite.verify_timeout_s,
                                                   num_workers=suite.verify_workers) as verifier:
        def generator():
            hf_dir = stack.enter_context(_served_directory(source, export_workers, out if in_job else None,
                                                           progress))
            made = make_generator(hf_dir) if make_generator is not None else \
                EngineGenerator(build_eval_engine(suite.engine, suite.decoding, hf_dir), suite.decoding)
            stack.callback(getattr(made, "close", lambda: None))
            return made

        label = Path(model).absolute().name  # the run / checkpoint name the user gave, for the table's row
        return Evaluation(suite, loaded, outdir, generator, verifier, model=label, progress=progress).run()


@contextlib.contextmanager
def _served_directory(source, export_workers: int, job_dir, progress: bool):
    """hf_directory; inside a job (`job_dir` set: OUT, which this evaluation owns) the export goes under job_dir,
    where every rank can read it, and runs as its own job."""
    if job_dir is None:
        with hf_directory(source, export_workers, progress=progress) as hf_dir:
            yield hf_dir
        return
    from spark_megatron.eval.ranks import outside_the_job

    for stale in Path(job_dir).glob(f"{EXPORT_PREFIX}*"):  # a killed job's export (a full copy of the model)
        shutil.rmtree(stale, ignore_errors=True)
    cm = hf_directory(source, export_workers, workdir=str(job_dir), progress=progress)
    with outside_the_job():
        hf_dir = cm.__enter__()
    try:
        yield hf_dir
    finally:
        cm.__exit__(None, None, None)
