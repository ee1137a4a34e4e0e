"""Megatron checkpoint (this project's format, saved at any TP/PP) -> HF safetensors directory, streamed.

No model is loaded. Every worker builds the model as a TP1/PP1 skeleton on the meta device (megatron's sharded
state dict of it says, per parameter, which global checkpoint tensor and region holds it) and plans the same list
of HF files: the HF tensors in model order, cut into files of at most --max-shard-size, with their names, shapes
and byte offsets known up front. Each worker writes its share of the files one at a time: a file's header first,
then for each parameter the chunks read from the dist-checkpoint files into one buffer (dcp_files), the mapping's
HF tensors written straight after. So a worker holds one parameter (plus the fused parameters' split copies) at a
time, whatever the model size; rank 0 then writes the index, config.json and side files and publishes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from spark_megatron.checkpoint import atomic, launcher
from spark_megatron.checkpoint.hf_import import DTYPES, Scratch, build_skeleton, hf_config_dtype
from spark_megatron.checkpoint.megatron_format import copy_aux_files, prepare_temp_dir, read_meta
from spark_megatron.models.families import family_for_config
from spark_megatron.models.hf_files import safetensors_header, tensor_bytes, write_all
from spark_megatron.models.qwen2 import ModelSpecError
from spark_megatron.models.weights import CheckpointError

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class ExportPlan:
    """A validated Megatron -> HF export (picklable: it is what each worker receives)."""

    ckpt_dir: str
    out: str
    workers: int
    """Processes writing the HF files (each takes every workers-th file)."""
    dtype: str
    """dtype of the written tensors (defaults to the stored HF config's dtype)."""
    max_shard_bytes: int
    """A file is closed before it would exceed this many bytes (a single larger tensor gets its own file)."""
    hf_naming: str
    """Tensor-name scheme to write (e.g. 'hub' or 'transformers' for Qwen2.5-VL)."""
    force: bool
    progress: bool


def plan_megatron_to_hf(ckpt_dir, out, workers: int = 1, dtype: Optional[str] = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, hf_naming: Optional[str] = None,
                        force: bool = False, progress: bool = True) -> ExportPlan:
    """Validate the checkpoint and output before any worker starts."""
    if workers < 1:
        raise ModelSpecError(f"workers must be >= 1 (got {workers})")
    if max_shard_bytes <= 0:
        raise ModelSpecError(f"max shard size must be positive, got {max_shard_bytes}")
    meta = read_meta(ckpt_dir)
    for name in ("metadata.json", ".metadata"):
        if not (Path(ckpt_dir) / name).is_file():
            raise CheckpointError(f"{ckpt_dir}: no {name} (incomplete dist-checkpoint)")
    source = str(Path(ckpt_dir) / "spark_meta.json")
    family = family_for_config(meta.hf_config, source)
    family.shape_from_hf_dict(meta.hf_config, source)
    naming = hf_naming or meta.hf_naming or family.hf_namings()[0]
    if naming not in family.hf_namings():
        raise ModelSpecError(f"--hf-naming {naming}: {family.name} checkpoints are named "
                             f"{' or '.join(family.hf_namings())}")
    if dtype is not None and dtype not in DTYPES:
        raise ModelSpecError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    out_path = atomic.check_output_dir(out, force)
    return ExportPlan(ckpt_dir=str(Path(ckpt_dir).absolute()), out=str(out_path), workers=workers,
                      dtype=dtype or hf_config_dtype(meta.hf_config), max_shard_bytes=int(max_shard_bytes),
                      hf_naming=naming, force=force, progress=progress)


# ------------------------------------------------------------------------------------------ the HF file plan

@dataclass
class ParamGroup:
    """One Megatron parameter and the HF tensors its mapping makes of it (written consecutively)."""

    param: str
    """Local (= global, at PP1) parameter name in the skeleton."""
    mapping: object
    names: list
    """HF names in the written scheme."""
    shapes: list

    def nbytes(self, itemsize: int) -> int:
        return sum(_numel(s) for s in self.shapes) * itemsize


@dataclass
class HFFile:
    name: str
    groups: list = field(default_factory=list)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_files(skeleton, registry, tied: bool, naming, scheme: str, itemsize: int, max_bytes: int) -> list:
    """The HF files of the model: parameter groups in model order, a new file when the next group would make the
    current one exceed `max_bytes` (a fused group is never split across files)."""
    from spark_megatron.models.layout import hf_shapes
    from spark_megatron.models.weights import mapping_for, global_param_names

    files, size = [HFFile("")], 0
    for name, param in global_param_names(skeleton):
        mapping, layer = mapping_for(registry, name, tied)
        hub_names = mapping.resolve(layer)[1]
        names = [naming.to_scheme(h, scheme) if naming is not None else h for h in hub_names]
        group = ParamGroup(name, mapping, names, list(hf_shapes(mapping, tuple(param.shape), 1)))
        nbytes = group.nbytes(itemsize)
        if files[-1].groups and size + nbytes > max_bytes:
            files.append(HFFile(""))
            size = 0
        files[-1].groups.append(group)
        size += nbytes
    for i, f in enumerate(files):
        f.name = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    return files


# ------------------------------------------------------------------------------------------------ writing

def _assemble(reader, views: list, buf) -> None:
    """Fill `buf` (shaped like the TP1 parameter) from the checkpoint: each sharded view's global region."""
    for v in views:
        reader.read_into(v.key, v.global_offset, v.of(buf))


def write_file(path: Path, hf_file: HFFile, skeleton_params: dict, views: dict, reader, dtype, scratch,
               bar) -> int:
    """Write one HF file: header, then each group's tensors, each straight from the checkpoint's chunk files when
    it is made of whole stored rows of its dtype (row_pieces), else from the parameter assembled in `scratch`.
    Returns bytes written."""
    from spark_megatron.checkpoint.atomic import Writeback
    from spark_megatron.checkpoint.row_pieces import export_pieces, hf_row_runs
    from spark_megatron.models.hf_files import write_pieces

    entries = [(n, s) for g in hf_file.groups for n, s in zip(g.names, g.shapes)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    writeback = Writeback(fd)
    try:
        head = safetensors_header(entries, dtype)
        write_all(fd, memoryview(head))
        written = len(head)
        for g in hf_file.groups:
            param = skeleton_params[g.param]
            outs = None
            for i, (name, shape) in enumerate(zip(g.names, g.shapes)):
                runs = hf_row_runs(g.mapping, tuple(param.shape), i) if param.dtype == dtype else None
                pieces = None if runs is None else export_pieces(runs, views[g.param], tuple(param.shape), reader,
                                                                 dtype)
                if pieces is not None:
                    n = write_pieces(fd, pieces, writeback.wrote)
                else:
                    if outs is None:
                        full = scratch.take(param.shape, param.dtype)
                        _assemble(reader, views[g.param], full)
                        outs = g.mapping.full_to_hf(full)
                    t = outs[i]
                    if tuple(t.shape) != tuple(shape):
                        raise CheckpointError(f"{name}: exported shape {tuple(t.shape)}, planned {tuple(shape)}")
                    data = tensor_bytes(t.to(dtype).contiguous())
                    write_all(fd, data)
                    n = len(data)
                    writeback.wrote(n)
                if n != _numel(shape) * dtype.itemsize:
                    raise CheckpointError(f"{name}: wrote {n} bytes for {tuple(shape)}")
                written += n
                bar.update(1)
        writeback.finish()
    except BaseException:
        writeback.finish(sync=False)
        raise
    finally:
        os.close(fd)
    return written


def _export_rank(rank: int, world: int, plan: ExportPlan) -> dict:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from spark_megatron.checkpoint.dcp_files import DistcpReader
    from spark_megatron.checkpoint.megatron_format import stage_shard_views
    from spark_megatron.parallel.groups import init_distributed

    t0 = time.perf_counter()
    launcher.quiet_known_warnings()
    init_distributed(1, 1)  # every worker sees the whole model (TP1, PP1; the workers are data-parallel ranks)
    launcher.reset_peak_rss()
    rss_after_init = launcher.memory_stats()["rss_bytes"]
    t_init = time.perf_counter()
    try:  # every step here fails on all ranks alike, so returning an error is safe
        meta = read_meta(plan.ckpt_dir)
        family = family_for_config(meta.hf_config)
        shape = family.shape_from_hf_dict(meta.hf_config)
        skeleton = build_skeleton(family, shape, meta.dtype, meta.vocab_divisible_by)
        views, _ = stage_shard_views(skeleton, main_replicas_only=False)
        reader = DistcpReader(plan.ckpt_dir)
        dtype = getattr(torch, plan.dtype)
        registry = family.mappings(shape, meta.vocab_divisible_by)
        files = plan_files(skeleton, registry, shape.tie_word_embeddings, family.hf_naming, plan.hf_naming,
                           dtype.itemsize, plan.max_shard_bytes)
        _check_complete(files, registry, family.hf_naming, plan.hf_naming)
        tmp = prepare_temp_dir(plan.out, plan.force)
    except launcher.USER_ERRORS as e:
        return launcher.error_value(e)
    t_plan = time.perf_counter()
    mine = files[rank::world]
    bar = tqdm(total=sum(len(g.names) for f in mine for g in f.groups), unit="tensor", desc="megatron->hf",
               disable=not (plan.progress and rank == 0))
    params, scratch, status, nbytes = dict(skeleton.named_parameters()), Scratch(), None, 0
    try:
        for f in mine:
            nbytes += write_file(tmp / f.name, f, params, views, reader, dtype, scratch, bar)
    except launcher.USER_ERRORS as e:
        status = launcher.error_value(e)
    except BaseException:
        if rank == 0:
            atomic.discard(tmp)
        raise
    finally:
        bar.close()
    try:
        statuses = [None] * dist.get_world_size()
        dist.all_gather_object(statuses, status)
        status = next((s for s in statuses if s is not None), ("ok", ""))
        if rank == 0:
            status = _publish(tmp, plan, meta.hf_config, files) if status[0] == "ok" else _discard(tmp, status)
        status = _broadcast_status(status)
    except BaseException:
        if rank == 0:
            atomic.discard(tmp)
        raise
    if status[0] == "error":
        return status
    return {"init_s": t_init - t0, "plan_s": t_plan - t_init, "write_s": time.perf_counter() - t_plan,
            "bytes_written": nbytes, "files": len(mine), "scratch_bytes": scratch.nbytes,
            "rss_after_init_bytes": rss_after_init, "peak_rss_bytes": launcher.memory_stats()["peak_rss_bytes"]}


def _check_complete(files: list, registry, naming, scheme: str) -> None:
    """The planned HF tensors are exactly the model's (each once): nothing dropped, nothing duplicated."""
    planned = [n for f in files for g in f.groups for n in g.names]
    expected = {naming.to_scheme(h, scheme) if naming is not None else h for h in registry.hf_names()}
    if len(set(planned)) != len(planned) or set(planned) != expected:
        diff = sorted(expected ^ set(planned)) or sorted({n for n in planned if planned.count(n) > 1})
        raise CheckpointError(f"exported tensors differ from the model's HF tensors (e.g. '{diff[0]}')")


def _discard(tmp: Path, status: tuple) -> tuple:
    atomic.discard(tmp)
    return status


def finalize_hf_dir(tmp: Path, files: list, hf_config: dict, dtype: str, itemsize: int, aux_from) -> None:
    """Rank 0: the index (if several files), config.json (dtype set to the written one) and the side files."""
    if len(files) > 1:
        weight_map = {n: f.name for f in files for g in f.groups for n in g.names}
        total = sum(g.nbytes(itemsize) for f in files for g in f.groups)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    cfg = dict(hf_config)
    cfg["dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    copy_aux_files(aux_from, tmp)


def _publish(tmp: Path, plan: ExportPlan, hf_config: dict, files: list) -> tuple:
    """Rank 0: every planned file is there; finalize and commit."""
    import torch

    try:
        for f in files:
            if not (tmp / f.name).is_file():
                raise CheckpointError(f"{plan.out}: {f.name} was not written")
        finalize_hf_dir(tmp, files, hf_config, plan.dtype, getattr(torch, plan.dtype).itemsize, plan.ckpt_dir)
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


def export_megatron_to_hf(ckpt_dir, out, workers: int = 1, dtype: Optional[str] = None,
                          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, hf_naming: Optional[str] = None,
                          force: bool = False, progress: bool = True, timeout_s: float = 3600) -> list:
    """Export a Megatron checkpoint to an HF directory loading with `from_pretrained`; per-worker timings."""
    plan = plan_megatron_to_hf(ckpt_dir, out, workers, dtype, max_shard_bytes, hf_naming, force, progress)
    try:
        return launcher.run_layout(_export_rank, workers, plan, timeout_s=timeout_s)
    finally:
        if not launcher.under_torchrun():  # pids of other nodes' writers mean nothing here
            atomic.remove_stale_temps(plan.out)
