"""HF safetensors checkpoint -> Megatron checkpoint (this project's format) at any TP/PP.

Everything that can be checked without building a model (family, layout divisibility, every shard readable,
every tensor the model needs present and none unmapped, output directory writable) is checked in the calling
process before any rank starts; each rank then builds its stage, fills it from the HF tensors it needs and
joins the collective save.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from spark_megatron.checkpoint import atomic, launcher
from spark_megatron.checkpoint.megatron_format import (CheckpointMeta, save_megatron_checkpoint,
                                                       use_in_process_write_queue)
from spark_megatron.models.families import load_family, read_hf_config
from spark_megatron.models.mapping import MappingError
from spark_megatron.models.qwen2 import ModelSpecError, padded_vocab_size
from spark_megatron.models.weights import CheckpointError, HFCheckpointReader

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ImportPlan:
    """A validated HF -> Megatron conversion (picklable: it is what each rank receives)."""

    hf_dir: str
    out: str
    tp: int
    pp: int
    dtype: str
    """Megatron parameter dtype (defaults to the HF config's dtype)."""
    force: bool
    """Replace a non-empty output directory."""
    progress: bool
    """tqdm bars on rank 0."""


def hf_config_dtype(cfg: dict) -> str:
    """The dtype the HF config declares (transformers 5 writes `dtype`, 4.x `torch_dtype`); float32 if none."""
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return d if d in DTYPES else "float32"


def check_hf_tensors(reader: HFCheckpointReader, registry, tied: bool) -> None:
    """Every tensor the model needs is present; every tensor present maps somewhere (no silent drops)."""
    present = set(reader.keys())
    for name in registry.hf_names():
        if name not in present:
            raise CheckpointError(f"{reader.dir}: tensor '{name}' is missing from the checkpoint")
    for name in sorted(present):
        if tied and name == "lm_head.weight":
            continue  # some writers store the tied head anyway; it is the embedding
        try:
            registry.for_hf(name)
        except MappingError as e:
            raise MappingError(f"{reader.dir}: {e} (no Megatron parameter to put it in)") from None


def plan_hf_to_megatron(hf_dir, out, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                        force: bool = False, progress: bool = True) -> ImportPlan:
    """Validate everything that can be validated without ranks; raises ModelSpecError/CheckpointError/..."""
    if tp < 1 or pp < 1:
        raise ModelSpecError(f"TP and PP must be >= 1 (got TP {tp}, PP {pp})")
    family, shape = load_family(hf_dir)
    family.check_layout(shape, tp, pp)
    if dtype is not None and dtype not in DTYPES:
        raise ModelSpecError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    reader = HFCheckpointReader(hf_dir)
    check_hf_tensors(reader, family.mappings(shape), shape.tie_word_embeddings)
    out_path = atomic.check_output_dir(out, force)
    return ImportPlan(hf_dir=str(Path(hf_dir).absolute()), out=str(out_path), tp=tp, pp=pp,
                      dtype=dtype or hf_config_dtype(read_hf_config(hf_dir)), force=force, progress=progress)


def build_stage_for_loading(family, shape, dtype: str):
    """This rank's stage without random initialisation (every parameter is loaded right after).

    Families whose build_stage does not take `init_weights` (anywhere down its provider) are built the
    ordinary way, with their random init.
    """
    try:
        return family.build_stage(shape, dtype, init_weights=False)
    except TypeError as e:
        if "init_weights" not in str(e):
            raise
        return family.build_stage(shape, dtype)


class _CountingReader:
    """Forwards to an HFCheckpointReader and advances a progress bar per tensor read."""

    def __init__(self, reader: HFCheckpointReader, bar):
        self._reader, self._bar = reader, bar
        self.bytes_read = 0

    def get(self, name):
        t = self._reader.get(name)
        self.bytes_read += t.numel() * t.element_size()
        self._bar.update(1)
        return t

    def __getattr__(self, item):
        return getattr(self._reader, item)


def stage_hf_tensor_count(stage, registry, tied: bool, exporting: bool = False) -> int:
    """HF tensors this stage reads on load (or writes on export: a tied output layer is not exported)."""
    from spark_megatron.models.weights import _mapping_for, global_param_names

    n = 0
    for name, _ in global_param_names(stage):
        if exporting and tied and name.endswith("output_layer.weight"):
            continue
        mapping, layer = _mapping_for(registry, name, tied)
        n += len(mapping.resolve(layer)[1])
    return n


def _import_rank(rank: int, world: int, plan: ImportPlan) -> dict:
    """One rank: build the stage, load its HF shard, save collectively. Returns timings (seconds)."""
    import torch.distributed as dist
    from tqdm import tqdm

    from spark_megatron.models.weights import load_hf_weights
    from spark_megatron.parallel.groups import init_distributed

    t0 = time.perf_counter()
    launcher.quiet_known_warnings()
    init_distributed(plan.tp, plan.pp)
    use_in_process_write_queue()
    rss_after_init = launcher.memory_stats()["rss_bytes"]
    t_init = time.perf_counter()
    family, shape = load_family(plan.hf_dir)
    stage = build_stage_for_loading(family, shape, plan.dtype)
    registry = family.mappings(shape)
    t_build = time.perf_counter()
    status = None
    bar = tqdm(total=stage_hf_tensor_count(stage, registry, shape.tie_word_embeddings), unit="tensor",
               desc="hf->megatron: load", disable=not (plan.progress and rank == 0))
    reader = _CountingReader(HFCheckpointReader(plan.hf_dir), bar)
    try:
        load_hf_weights(stage, reader, registry, tied=shape.tie_word_embeddings)
    except launcher.USER_ERRORS as e:
        status = launcher.error_value(e)
    finally:
        bar.close()
    t_load = time.perf_counter()
    try:
        launcher.agree(status)
        meta = CheckpointMeta(family=family.name, hf_config=read_hf_config(plan.hf_dir),
                              padded_vocab_size=padded_vocab_size(shape.vocab_size, 128, plan.tp),
                              dtype=plan.dtype)
        if rank == 0 and plan.progress:
            print(f"hf->megatron: saving TP{plan.tp} PP{plan.pp} checkpoint to {plan.out}", flush=True)
        save_megatron_checkpoint(stage, plan.out, meta, aux_from=plan.hf_dir, force=plan.force)
    except launcher.USER_ERRORS as e:
        return launcher.error_value(e)
    t_save = time.perf_counter()
    dist.barrier()
    return {"init_s": t_init - t0, "build_s": t_build - t_init, "load_s": t_load - t_build,
            "save_s": t_save - t_load, "bytes_read": reader.bytes_read, "rss_after_init_bytes": rss_after_init,
            "peak_rss_bytes": launcher.memory_stats()["peak_rss_bytes"]}


def convert_hf_to_megatron(hf_dir, out, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                           force: bool = False, progress: bool = True, timeout_s: float = 3600) -> list:
    """Convert an HF checkpoint to a Megatron checkpoint saved at TP x PP; returns per-rank timings.

    Raises ModelSpecError / MappingError / CheckpointError (one-line messages) and leaves no output on failure.
    """
    plan = plan_hf_to_megatron(hf_dir, out, tp, pp, dtype, force, progress)
    try:
        return launcher.run_layout(_import_rank, tp * pp, plan, timeout_s=timeout_s)
    finally:
        if not launcher.under_torchrun():  # pids of other nodes' writers mean nothing here
            atomic.remove_stale_temps(plan.out)
