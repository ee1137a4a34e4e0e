"""Megatron checkpoint (this project's format) -> HF safetensors directory, streamed with bounded memory.

The checkpoint is loaded at an export layout (TP x PP, any source layout: dist_checkpointing reshards). Each
pipeline stage's TP-rank-0 writes the HF tensors of its stage into its own shard files, flushing a file
whenever it reaches the size limit, so no process ever holds more than one shard plus one gathered parameter.
After a barrier rank 0 names the files `model-0000i-of-0000N.safetensors`, writes the index, config.json and the
tokenizer/generation/processor files, and publishes the directory atomically.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from spark_megatron.checkpoint import atomic, launcher
from spark_megatron.checkpoint.hf_import import (DTYPES, build_stage_for_loading, hf_config_dtype,
                                                  stage_hf_tensor_count)
from spark_megatron.checkpoint.megatron_format import (copy_aux_files, load_megatron_checkpoint, prepare_temp_dir,
                                                       read_meta)
from spark_megatron.models.families import family_for_config
from spark_megatron.models.qwen2 import ModelSpecError, padded_vocab_size
from spark_megatron.models.weights import CheckpointError

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class ExportPlan:
    """A validated Megatron -> HF export (picklable: it is what each rank receives)."""

    ckpt_dir: str
    out: str
    tp: int
    pp: int
    dtype: str
    """dtype of the written tensors (defaults to the stored HF config's dtype)."""
    max_shard_bytes: int
    """A shard file is closed once it holds this many bytes (a single larger tensor gets its own file)."""
    force: bool
    progress: bool


def plan_megatron_to_hf(ckpt_dir, out, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
                        progress: bool = True) -> ExportPlan:
    """Validate the checkpoint, layout and output before any rank starts."""
    if tp < 1 or pp < 1:
        raise ModelSpecError(f"TP and PP must be >= 1 (got TP {tp}, PP {pp})")
    if max_shard_bytes <= 0:
        raise ModelSpecError(f"max shard size must be positive, got {max_shard_bytes}")
    meta = read_meta(ckpt_dir)
    if not (Path(ckpt_dir) / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt_dir}: no metadata.json (incomplete dist-checkpoint)")
    family = family_for_config(meta.hf_config, str(Path(ckpt_dir) / "spark_meta.json"))
    shape = family.shape_from_hf_dict(meta.hf_config, str(Path(ckpt_dir) / "spark_meta.json"))
    family.check_layout(shape, tp, pp)
    if padded_vocab_size(shape.vocab_size, 128, tp) != meta.padded_vocab_size:
        raise ModelSpecError(f"TP {tp} pads the vocab to {padded_vocab_size(shape.vocab_size, 128, tp)}, the "
                             f"checkpoint has {meta.padded_vocab_size}: export at a TP that divides 128")
    if dtype is not None and dtype not in DTYPES:
        raise ModelSpecError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    out_path = atomic.check_output_dir(out, force)
    return ExportPlan(ckpt_dir=str(Path(ckpt_dir).absolute()), out=str(out_path), tp=tp, pp=pp,
                      dtype=dtype or hf_config_dtype(meta.hf_config), max_shard_bytes=int(max_shard_bytes),
                      force=force, progress=progress)


class ShardWriter:
    """Accumulates (name, tensor) pairs and writes a safetensors file each time the size limit is reached."""

    def __init__(self, directory: Path, prefix: str, max_bytes: int):
        self.dir, self.prefix, self.max_bytes = Path(directory), prefix, max_bytes
        self.files: list = []
        """[(file name, [tensor names], bytes)] in write order."""
        self._pending: dict = {}
        self._pending_bytes = 0
        self.peak_pending_bytes = 0

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.peak_pending_bytes = max(self.peak_pending_bytes, self._pending_bytes)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        fname = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_file(self._pending, str(self.dir / fname), metadata={"format": "pt"})
        self.files.append((fname, list(self._pending), self._pending_bytes))
        self._pending, self._pending_bytes = {}, 0


def finalize_hf_dir(tmp: Path, records: list, hf_config: dict, dtype: str, aux_from) -> list:
    """Rank 0: give the stage files their HF names, write the index (if several files), config and aux files.

    `records` = every writer's `files` in pipeline-stage order. Returns the final file names.
    """
    files = [f for rec in records for f in rec]
    names = [n for _, tensor_names, _ in files for n in tensor_names]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(f"tensor '{dup}' was exported twice")
    final, weight_map = [], {}
    for i, (fname, tensor_names, _) in enumerate(files):
        new = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.rename(tmp / fname, tmp / new)
        final.append(new)
        weight_map.update({n: new for n in tensor_names})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(b for _, _, b in files)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    cfg = dict(hf_config)
    cfg["dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    copy_aux_files(aux_from, tmp)
    return final


def _export_stage(stage, registry, tied: bool, writer: Optional[ShardWriter], dtype: str, bar) -> int:
    """Stream this stage's HF tensors into `writer` (None on TP ranks that only join the gathers)."""
    import torch

    from spark_megatron.models.weights import export_hf_weights

    nbytes = 0
    for name, t in export_hf_weights(stage, registry, tied, getattr(torch, dtype)):
        if writer is not None:
            writer.add(name, t)
            nbytes += t.numel() * t.element_size()
            bar.update(1)
    if writer is not None:
        writer.flush()
    return nbytes


def _export_rank(rank: int, world: int, plan: ExportPlan) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from spark_megatron.parallel.groups import init_distributed

    t0 = time.perf_counter()
    launcher.quiet_known_warnings()
    init_distributed(plan.tp, plan.pp)
    rss_after_init = launcher.memory_stats()["rss_bytes"]
    t_init = time.perf_counter()
    try:  # every step here fails on all ranks alike (collective checks), so returning an error is safe
        meta = read_meta(plan.ckpt_dir)
        family = family_for_config(meta.hf_config)
        shape = family.shape_from_hf_dict(meta.hf_config)
        stage = build_stage_for_loading(family, shape, meta.dtype)
        load_megatron_checkpoint(stage, plan.ckpt_dir)
        t_load = time.perf_counter()
        tmp = prepare_temp_dir(plan.out, plan.force)
    except launcher.USER_ERRORS as e:
        return launcher.error_value(e)
    writes = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    stage_idx = ps.get_pipeline_model_parallel_rank()
    writer = ShardWriter(tmp, f"stage{stage_idx:03d}", plan.max_shard_bytes) if writes else None
    registry = family.mappings(shape)
    bar = tqdm(total=stage_hf_tensor_count(stage, registry, shape.tie_word_embeddings, exporting=True),
               unit="tensor", desc="megatron->hf: write", disable=not (plan.progress and rank == 0))
    try:
        nbytes = _export_stage(stage, registry, shape.tie_word_embeddings, writer, plan.dtype, bar)
        bar.close()
        records = [None] * dist.get_world_size()
        dist.all_gather_object(records, (stage_idx, writer.files if writer else None))
        status = ("ok", "")
        if rank == 0:
            status = _publish(tmp, plan, meta.hf_config, records, registry)
        status = _broadcast_status(status)
    except BaseException:
        if rank == 0:
            atomic.discard(tmp)
        raise
    if status[0] == "error":
        return status
    return {"init_s": t_init - t0, "load_s": t_load - t_init, "write_s": time.perf_counter() - t_load,
            "bytes_written": nbytes, "peak_pending_bytes": writer.peak_pending_bytes if writer else 0,
            "rss_after_init_bytes": rss_after_init, "peak_rss_bytes": launcher.memory_stats()["peak_rss_bytes"]}


def _publish(tmp: Path, plan: ExportPlan, hf_config: dict, records: list, registry) -> tuple:
    """Rank 0: check the exported set against the model's HF tensor list, finalize and commit."""
    by_stage = sorted((r for r in records if r[1] is not None), key=lambda r: r[0])
    try:
        exported = {n for _, files in by_stage for _, names, _ in files for n in names}
        expected = set(registry.hf_names())
        if exported != expected:
            diff = sorted(expected ^ exported)
            raise CheckpointError(f"{plan.ckpt_dir}: exported tensors differ from the model's HF tensors "
                                  f"({len(diff)} differ, e.g. '{diff[0]}')")
        finalize_hf_dir(tmp, [files for _, files in by_stage], hf_config, plan.dtype, plan.ckpt_dir)
        atomic.commit(tmp, plan.out, plan.force)
    except (OSError, CheckpointError) as e:
        atomic.discard(tmp)
        return ("error", "CheckpointError", str(e))
    return ("ok", "")


def _broadcast_status(status):
    import torch.distributed as dist

    box = [status]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def export_megatron_to_hf(ckpt_dir, out, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
                          progress: bool = True, timeout_s: float = 3600) -> list:
    """Export a Megatron checkpoint to an HF directory loading with `from_pretrained`; per-rank timings."""
    plan = plan_megatron_to_hf(ckpt_dir, out, tp, pp, dtype, max_shard_bytes, force, progress)
    try:
        return launcher.run_layout(_export_rank, tp * pp, plan, timeout_s=timeout_s)
    finally:
        if not launcher.under_torchrun():  # pids of other nodes' writers mean nothing here
            atomic.remove_stale_temps(plan.out)
