"""A run directory belongs to one run.

`<output_dir>/run.json` names the run (a random id, also the wandb run id) and is written when a run claims the
directory. Every checkpoint records that id, so resuming and pruning only ever see the checkpoints of the run
being written. Without `--resume`, a directory that holds a run is refused; `--force` removes the run's files
(listed below, nothing else) and starts over.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from spark_megatron.config import ConfigError

RUN_FILE = "run.json"
RUN_ARTIFACTS = (RUN_FILE, "config.yaml", "metrics.jsonl", "checkpoints", "warmup_model", "tensorboard", "wandb",
                 "logs")
"""What a run writes into its output_dir. `tiny_model/` (a seeded model cache) and `launch/` (job files of
`spark-megatron launch`, written before the run starts) are not run state."""


class RunDirError(ConfigError):
    """output_dir cannot be used as asked (holds another run, is not writable, ...)."""


def run_artifacts(output_dir) -> list:
    """The run files present in output_dir, in RUN_ARTIFACTS order."""
    out = Path(output_dir)
    return [out / name for name in RUN_ARTIFACTS if (out / name).exists()]


def check_writable(output_dir) -> None:
    """output_dir is a directory (or can be created as one) that this user can write."""
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir {out} exists and is not a directory")
    probe = out
    while not probe.exists():  # the nearest existing ancestor decides whether the directory can be created
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(f"output_dir {out}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"output_dir {out}: {probe} is not writable")


def check_ownership(output_dir, resume: bool, force: bool) -> list:
    """Refuse a directory holding a run unless resuming or forcing; returns what `--force` will remove."""
    if resume and force:
        raise RunDirError("--resume (or checkpoint.resume=true) continues the run in output_dir and --force "
                          "deletes it: use one of them")
    found = run_artifacts(output_dir)
    if found and not (resume or force):
        names = ", ".join(p.name for p in found)
        raise RunDirError(f"output_dir {output_dir} holds a run ({names}): pass --resume to continue it, --force "
                          "to delete it and start over, or choose another output_dir")
    return found if force else []


def remove_run(output_dir) -> list:
    """--force: delete the run files of output_dir (RUN_ARTIFACTS only; anything else stays); returns them."""
    found = run_artifacts(output_dir)
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return found


def claim(output_dir, resume: bool) -> str:
    """Create output_dir/run.json for a new run, or read the id of the run being resumed (a directory from
    before run ids gets one now; its checkpoints carry none and stay resumable). Returns the run id."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = read_run_id(out) if resume else None
    if existing is not None:
        return existing
    run_id = uuid.uuid4().hex[:16]
    legacy = resume and any((out / "checkpoints").glob("step_*"))
    record = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "checkpoints_without_id": bool(legacy)}
    tmp = out / f".{RUN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, out / RUN_FILE)
    return run_id


def read_run_id(output_dir) -> Optional[str]:
    """The id in output_dir/run.json, None when there is none."""
    path = Path(output_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def adopts_unmarked_checkpoints(output_dir) -> bool:
    """True for a directory whose run predates run ids: its checkpoints (without an id) belong to the run."""
    try:
        return bool(json.loads((Path(output_dir) / RUN_FILE).read_text()).get("checkpoints_without_id"))
    except (OSError, ValueError, AttributeError):
        return True  # no run.json at all: a directory written before run ids
