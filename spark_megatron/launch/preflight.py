"""What `spark-megatron train` checks in the launching process before any model or engine is built.

Stage 1, before torch, transformers or vLLM are imported (well under a second): the range or choices of every
config value (config.FIELD_RULES), the hardware-free recipe checks `spark-megatron plan` runs (layout, batch
split, precision target) for the ranks this job will have, the actor's own limits, paths (model, megatron
checkpoint, output_dir writable), whether output_dir holds another run, and a scan of every data record
(parses, has an answer, its images decode, its lines are UTF-8).
Stage 2, once the model directory is at hand: the model's shape against TP/PP, the engine against the model,
every prompt's length with the real tokenizer and chat template (over-long prompts are reported here and
dropped by the trainer), and on resume the checkpoints it could load.

A problem is one line (ConfigError, DataError, RecipeError, CheckpointError); train_entry prints it and exits 2.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from spark_megatron.config import ConfigError, RunConfig, check_values
from spark_megatron.launch.validation import RecipeError, validate_recipe
from spark_megatron.run_dir import check_ownership, check_writable

EXIT_USER_ERROR = 2
"""Exit status for configuration, data and checkpoint errors (one line printed, traceback in the rank log)."""
EXIT_STOPPED = 3
"""Exit status of a run that stopped itself after too many bad updates (message names cause and checkpoint)."""


class RunAbort(RuntimeError):
    """A rank ended the run for a reason the user can act on; `user_message` is the one line to print."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR):
        super().__init__(message)
        self.user_message, self.exit_code = message, exit_code


# ---------------------------------------------------------------------------------------------- stage 1
def check_before_model(cfg: RunConfig, world: int, resume: bool, force: bool, owner: bool):
    """Stage 1; returns the loaded data (LoadedPrompts). `world`: ranks of the actor in this job; `owner`:
    this process decides about output_dir (rank 0)."""
    from spark_megatron.data import load_prompts

    check_values(cfg)
    recipe_layout(cfg, world, arch=None)
    actor_limits(cfg)
    check_writable(cfg.output_dir)
    model_paths(cfg)
    if owner:
        check_ownership(cfg.output_dir, resume, force)
    return load_prompts(cfg.data.train_files, on_bad_record=cfg.data.on_bad_record,  # as RunState loads them
                        image_max_pixels=cfg.data.image_max_pixels, image_min_pixels=cfg.data.image_min_pixels)


def recipe_layout(cfg: RunConfig, world: int, arch=None):
    """`plan`'s checks for the ranks this job really has (the recipe's launch section describes a cluster)."""
    job = dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, nodes=1, gpus_per_node=world,
                                                              executor="local"))
    try:
        return validate_recipe(job, arch)
    except RecipeError as e:
        raise RecipeError(f"recipe check failed: {e}") from None


def actor_limits(cfg: RunConfig) -> None:
    """Layouts the Megatron actor refuses when it is built (train/actor.py _check_layout)."""
    par = cfg.parallel
    if (par.virtual_pipeline_model_parallel_size or 1) > 1:
        raise ConfigError("parallel.virtual_pipeline_model_parallel_size: the actor does not support interleaved "
                          "pipelining yet (set it to null)")
    if par.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: not supported by the actor's model provider yet")


def model_paths(cfg: RunConfig) -> None:
    from spark_megatron.launch.train_entry import TINY_KINDS

    m = cfg.model
    if m.megatron_path:
        meta = Path(m.megatron_path) / "spark_meta.json"
        if not meta.is_file():
            raise ConfigError(f"model.megatron_path '{m.megatron_path}' is not a spark_megatron Megatron checkpoint "
                              "(no spark_meta.json)")
        vocab_divisor(cfg, meta)
        return
    if m.hf_path.startswith("tiny:"):
        if m.hf_path[5:] not in TINY_KINDS:
            raise ConfigError(f"model.hf_path '{m.hf_path}': tiny models are "
                              + ", ".join(f"tiny:{k}" for k in TINY_KINDS))
    elif not (Path(m.hf_path) / "config.json").is_file():
        raise ConfigError(f"model.hf_path '{m.hf_path}' is not an HF checkpoint directory (no config.json)")


def vocab_divisor(cfg: RunConfig, meta_file) -> None:
    """The checkpoint's vocab was padded with the divisor the trainer pads with, or its embedding cannot load."""
    import json

    try:
        saved = int(json.loads(Path(meta_file).read_text()).get("vocab_divisible_by", 128))
    except (OSError, ValueError, TypeError):
        return  # a damaged file is reported when the checkpoint is read, with its own message
    want = cfg.parallel.make_vocab_size_divisible_by
    if saved != want:
        raise ConfigError(f"model.megatron_path '{cfg.model.megatron_path}' pads its vocab to a multiple of {saved} "
                          f"but parallel.make_vocab_size_divisible_by is {want}: set it to {saved}, or convert the "
                          f"HF checkpoint again with --make-vocab-size-divisible-by {want}")


# ---------------------------------------------------------------------------------------------- stage 2
def check_with_model(cfg: RunConfig, world: int, hf_dir: str, loaded, resume: bool):
    """Stage 2; returns the LengthFilter of the loaded prompts (what the trainer will keep)."""
    import torch
    from transformers import AutoTokenizer

    from spark_megatron.data import DataError
    from spark_megatron.data.lengths import filter_by_length
    from spark_megatron.launch.architecture import ModelArchitecture
    from spark_megatron.models.qwen2 import ModelSpecError

    try:
        recipe_layout(cfg, world, ModelArchitecture.from_path(hf_dir))
    except ModelSpecError as e:
        raise ConfigError(f"{hf_dir}: {e}") from None
    if cfg.model.fp8 and not torch.cuda.is_available():
        raise ConfigError(f"model.fp8='{cfg.model.fp8}' needs a CUDA GPU with Transformer Engine; this machine "
                          "has no GPU (set model.fp8=null)")
    lengths = filter_by_length(AutoTokenizer.from_pretrained(hf_dir), loaded.prompts, cfg.rollout.max_prompt_tokens)
    if not lengths.kept:
        raise DataError(f"no prompt fits rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens} "
                        f"({lengths.summary()})")
    if resume:
        check_checkpoints(cfg, len(lengths.kept))
    return lengths


def check_checkpoints(cfg: RunConfig, num_prompts: int) -> Optional[str]:
    """On resume: the run's checkpoints, newest first, must include one that looks loadable and that was
    written for the same prompt list; returns its name (None: nothing to resume, the run starts fresh)."""
    from spark_megatron.checkpoint.megatron_format import read_meta
    from spark_megatron.checkpoint.train_state import checkpoint_run_id, complete_checkpoints, scan_checkpoint
    from spark_megatron.models.weights import CheckpointError
    from spark_megatron.run_dir import adopts_unmarked_checkpoints, read_run_id

    root = Path(cfg.output_dir) / "checkpoints"
    ok_ids = {read_run_id(cfg.output_dir)} | ({None} if adopts_unmarked_checkpoints(cfg.output_dir) else set())
    candidates = [p for p in reversed(complete_checkpoints(root)) if checkpoint_run_id(p) in ok_ids]
    damaged = []
    for ckpt in candidates:
        why = scan_checkpoint(ckpt)
        if why is None:
            stream = read_meta(ckpt).extra["train_state"]["extra_state"].get("stream", {})
            if stream.get("num_prompts", num_prompts) != num_prompts:
                raise ConfigError(f"{ckpt} was written for {stream['num_prompts']} prompts; the data now gives "
                                  f"{num_prompts}: data.train_files, data.on_bad_record or rollout.max_prompt_tokens "
                                  "changed since")
            return ckpt.name  # the ranks fall back past the damaged ones themselves, naming each
        damaged.append((ckpt.name, why))
    if damaged:
        raise CheckpointError(f"no checkpoint under {root} can be resumed from: "
                              + "; ".join(f"{n}: {r}" for n, r in damaged))
    return None
