"""Full training-state checkpoints of the actor: model + optimizer + LR schedule + RNG + trainer state.

Layout (the project's Megatron format, see megatron_format.py, so conversion tools export it to HF as is):
    <run_dir>/step_00000010/            one checkpoint, published by an atomic rename
        <dist_checkpointing files>      {"model": ..., "optimizer": ..., "rng_state": ...} (torch_dist)
        spark_meta.json                 CheckpointMeta; extra["train_state"] = scheduler, trainer state, layout
        tokenizer files                 copied from the HF directory
        complete                        marker, written last inside the temp dir
    <run_dir>/latest                    name of the newest checkpoint, replaced atomically after publishing

Optimizer state uses the DistributedOptimizer's `fully_reshardable` format, so a checkpoint saved at one TP/PP/DP
loads at another. RNG states are saved per rank and restored only at the same layout (elsewhere they do not
map one-to-one onto ranks).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from spark_megatron.checkpoint.atomic import fsync_dir
from spark_megatron.checkpoint.megatron_format import META_FILE, CheckpointMeta, model_sharded_state_dict, read_meta
from spark_megatron.models.weights import CheckpointError

COMPLETE_MARKER = "complete"
LATEST_FILE = "latest"
TRAIN_STATE_VERSION = 1
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(run_dir, step: int) -> Path:
    """Conventional directory of the checkpoint taken after `step` steps."""
    return Path(run_dir) / f"step_{int(step):08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": _world(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    """This rank's generators: python, numpy, torch CPU, CUDA (all devices) and megatron's tracker."""
    import numpy as np
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def restore_rng(state: dict) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(data) -> object:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", data, (_world(),), (_rank(),), replica_id=0)


# ---------------------------------------------------------------------------------------------- save
def _sharded_state(actor, is_loading: bool, rng_data=None, with_rng: bool = False) -> dict:
    sharded = model_sharded_state_dict(actor.model_chunks)
    if len(actor.model_chunks) != 1:
        raise CheckpointError("train-state checkpoints support one model chunk per rank (no virtual pipeline)")
    sharded["optimizer"] = actor.optimizer.sharded_state_dict(sharded["model"], is_loading=is_loading,
                                                              metadata=OPTIM_METADATA)
    if with_rng:
        sharded["rng_state"] = _rng_sharded(rng_data)
    return sharded


def _check_json(extra_state: dict) -> None:
    try:
        json.dumps(extra_state)
    except (TypeError, ValueError) as e:
        bad = next((k for k, v in extra_state.items() if not _json_ok(v)), "?")
        raise ValueError(f"extra_state['{bad}'] is not JSON-serialisable ({e})") from None


def _json_ok(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _train_meta(actor, extra_state: dict, rng: bool) -> CheckpointMeta:
    from spark_megatron.models.qwen2 import padded_vocab_size

    layout = _layout()
    train_state = {"version": TRAIN_STATE_VERSION, "scheduler": actor.scheduler.state_dict(),
                   "steps_done": actor.steps_done, "extra_state": extra_state, "layout": layout,
                   "rng_saved": bool(rng),
                   "use_distributed_optimizer": bool(actor.parallel_cfg.use_distributed_optimizer)}
    step = extra_state.get("step")
    return CheckpointMeta(
        family=actor.family.name, hf_config=actor.hf_config,
        padded_vocab_size=padded_vocab_size(actor.shape.vocab_size, actor.vocab_divisible_by, layout["tp"]),
        vocab_divisible_by=actor.vocab_divisible_by,
        dtype=actor.model_cfg.params_dtype, tp=layout["tp"], pp=layout["pp"],
        step=int(step) if isinstance(step, int) else None, extra={"train_state": train_state})


def save_model_snapshot(actor, out_dir) -> Path:
    """Model-only checkpoint of the actor's current weights (every rank calls), e.g. the warmed-up model that
    starts RL and serves as the frozen KL reference; loads with load_megatron_checkpoint at any layout."""
    from spark_megatron.checkpoint.megatron_format import save_megatron_checkpoint

    meta = _train_meta(actor, {}, rng=False)
    meta.extra = {}
    # with the tokenizer/chat-template files, so the snapshot exports to a servable HF directory
    aux = actor.hf_dir or getattr(actor.model_cfg, "megatron_path", None)
    return save_megatron_checkpoint(actor.model_chunks[0], out_dir, meta, aux_from=aux, force=True)


def save_train_state(actor, ckpt_dir, extra_state: dict, rng: bool = True,
                     keep_last: Optional[int] = None, belongs: Optional[Callable[[Path], bool]] = None,
                     protect: Iterable[str] = ()) -> Path:
    """Save everything needed to resume `actor` bit-exactly; every rank calls.

    `extra_state`: the trainer's JSON-serialisable state (step, data cursor, recycle queue, policy version,
    run id); its "step" (int) also becomes the checkpoint's step. The directory appears atomically with its
    `complete` marker; then `<parent>/latest` is pointed at it, and with `keep_last` older complete checkpoints
    in the same parent are deleted: only those for which `belongs(path)` holds (the run's own), never the names
    in `protect`. Returns the checkpoint directory.
    """
    from spark_megatron.checkpoint.megatron_format import save_sharded_checkpoint

    _check_json(extra_state)
    out = Path(ckpt_dir).absolute()
    meta = _train_meta(actor, extra_state, rng)
    sharded = _sharded_state(actor, is_loading=False, rng_data=capture_rng() if rng else None, with_rng=rng)

    def mark_complete(tmp: Path) -> None:
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": meta.step}) + "\n")

    def point_latest(published: Path) -> None:
        write_latest(published.parent, published.name)
        if keep_last:
            prune(published.parent, keep_last, keep=published.name, belongs=belongs, protect=protect)

    # tokenizer etc. travel along, so the checkpoint exports to a complete HF directory
    save_sharded_checkpoint(sharded, out, meta, aux_from=actor.hf_dir or getattr(actor.model_cfg, "megatron_path", None),
                            force=True, before_commit=mark_complete, after_commit=point_latest)
    return out


def write_latest(run_dir, name: str) -> None:
    """Atomically replace `<run_dir>/latest` with `name` (temp file + fsync + rename + dir fsync)."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{LATEST_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / LATEST_FILE)
    fsync_dir(run_dir)


# ---------------------------------------------------------------------------------------------- discovery
def is_complete(path) -> bool:
    """A published train-state checkpoint: marker and metadata present, not a temp/old sibling."""
    path = Path(path)
    return (path.is_dir() and ".tmp-" not in path.name and ".old-" not in path.name
            and (path / COMPLETE_MARKER).is_file() and (path / META_FILE).is_file())


def _step_of(path: Path) -> int:
    try:
        step = read_meta(path).step
    except CheckpointError:
        step = None
    if step is None:
        m = _STEP_DIR.match(path.name)
        step = int(m.group(1)) if m else -1
    return step


def complete_checkpoints(run_dir) -> list:
    """Complete checkpoints directly under run_dir, oldest first (by step, then name)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: (_step_of(p), p.name))


def find_latest_complete(run_dir) -> Optional[Path]:
    """The newest complete checkpoint under run_dir (None if there is none). Temp directories and ones
    without the `complete` marker are ignored; `latest` is only a hint (a crash after publishing a newer
    checkpoint but before updating it must not hide that checkpoint)."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_run_id(path) -> Optional[str]:
    """The run id a train-state checkpoint was written by (None: no id, or unreadable metadata)."""
    try:
        ts = read_meta(path).extra.get("train_state") or {}
    except CheckpointError:
        return None
    extra = ts.get("extra_state") if isinstance(ts, dict) else None
    return extra.get("run_id") if isinstance(extra, dict) else None


def run_checkpoints(run_dir, run_id: Optional[str], adopt_unmarked: bool = False) -> list:
    """Complete checkpoints written by run `run_id` (with `adopt_unmarked`, also those without an id), oldest
    first; checkpoints of any other run in the directory are not this run's to resume from or to prune."""
    ok = {run_id, None} if adopt_unmarked else {run_id}
    return [p for p in complete_checkpoints(run_dir) if checkpoint_run_id(p) in ok]


def prune(run_dir, keep_last: int, keep: Optional[str] = None, belongs: Optional[Callable[[Path], bool]] = None,
          protect: Iterable[str] = ()) -> list:
    """Delete all but the newest `keep_last` complete checkpoints (never `keep` or a name in `protect`; with
    `belongs`, only checkpoints it accepts are counted or deleted); returns what was removed."""
    found = [p for p in complete_checkpoints(run_dir) if belongs is None or belongs(p)]
    spared = {keep, *protect}
    doomed = [p for p in found[:max(len(found) - keep_last, 0)] if p.name not in spared]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------------------------- load
def load_train_state(actor, ckpt_dir, rng: bool = True) -> dict:
    """Restore model, optimizer, LR schedule (and RNG at the same layout) into `actor`; every rank calls.

    Returns the `extra_state` dict given to save_train_state. The actor must be freshly built (any TP/PP/DP
    whose padded vocabulary matches the checkpoint's).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from spark_megatron.train.optimizer import init_states_for_load, keep_adam_step_on_load

    ckpt_dir = Path(ckpt_dir)
    if not is_complete(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: not a complete train-state checkpoint (no '{COMPLETE_MARKER}' "
                              f"marker or {META_FILE})")
    meta = read_meta(ckpt_dir)
    ts = meta.extra.get("train_state")
    if not isinstance(ts, dict) or ts.get("version") != TRAIN_STATE_VERSION:
        raise CheckpointError(f"{ckpt_dir / META_FILE}: no train_state (version {TRAIN_STATE_VERSION}) in "
                              f"'extra' (a model-only checkpoint?)")
    same_layout = ts["layout"] == _layout()
    with_rng = rng and ts.get("rng_saved", False) and same_layout
    try:
        init_states_for_load(actor.optimizer)
        sharded = _sharded_state(actor, is_loading=True, with_rng=with_rng)
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir), strict=StrictHandling.RAISE_UNEXPECTED)
        actor.model_chunks[0].load_state_dict(loaded["model"], strict=True)
        with keep_adam_step_on_load(actor.optimizer):
            actor.optimizer.load_state_dict(loaded["optimizer"])
        actor.scheduler.num_steps = 0  # load_state_dict advances by the saved count
        actor.scheduler.load_state_dict(ts["scheduler"])
        actor.steps_done = int(ts.get("steps_done", 0))
        if with_rng:
            restore_rng(loaded["rng_state"])
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException derives from BaseException
        raise CheckpointError(f"{ckpt_dir}: cannot load train state ({load_failure_reason(e)})") from None
    return dict(ts["extra_state"])


def load_failure_reason(e: BaseException) -> str:
    """One line for a failed load: the first rank's own exception inside torch's CheckpointException (whose
    text is a traceback per rank), else the exception's first line."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else e
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def scan_checkpoint(ckpt_dir) -> Optional[str]:
    """Why a complete-looking checkpoint cannot load, as far as its structure tells without loading it (its
    metadata does not parse, a data file is missing or shorter than the metadata says); None if it looks sound.
    Bytes garbled inside a data file are only found by loading (load_train_state)."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt_dir = Path(ckpt_dir)
    if not is_complete(ckpt_dir):
        return f"no '{COMPLETE_MARKER}' marker or {META_FILE}"
    try:
        ts = read_meta(ckpt_dir).extra.get("train_state")
        if not isinstance(ts, dict) or ts.get("version") != TRAIN_STATE_VERSION:
            return f"no train_state (version {TRAIN_STATE_VERSION}) in {META_FILE}"
        storage = FileSystemReader(str(ckpt_dir)).read_metadata().storage_data
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - unpickling a damaged .metadata raises anything
        return load_failure_reason(e)
    need: dict = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        path = ckpt_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size < size:
            return f"{name} is truncated ({path.stat().st_size} of {size} bytes)"
    if not (ckpt_dir / "common.pt").is_file() or (ckpt_dir / "common.pt").stat().st_size == 0:
        return "common.pt is missing or empty"
    return None
