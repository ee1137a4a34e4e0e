"""HF safetensors checkpoint -> Megatron checkpoint (this project's format) at any TP/PP, streamed.

Everything that can be checked without ranks (family, layout divisibility, every shard readable, every tensor the
model needs present, none unmapped, a tied checkpoint's extra lm_head equal to the embedding, output writable) is
checked in the calling process before any rank starts. Each rank then builds its stage as a meta-device skeleton
(no memory, no initialisation: megatron's sharded state dict of it says which chunks this rank stores and where),
and for each of its parameters copies its slices out of the mmapped HF shards into one reusable buffer and
appends the chunks to its own `.distcp` file (dcp_files). Resident memory stays at about the largest parameter
shard; rank 0 writes the dist-checkpoint metadata and publishes the directory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from spark_megatron.checkpoint import atomic, launcher
from spark_megatron.checkpoint.megatron_format import CheckpointMeta, write_checkpoint
from spark_megatron.models.families import load_family, read_hf_config
from spark_megatron.models.mapping import MappingError
from spark_megatron.models.qwen2 import ModelSpecError, padded_vocab_size
from spark_megatron.models.weights import CheckpointError

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
    vocab_divisible_by: int = 128
    """The vocab is padded to a multiple of this (the training recipe's parallel.make_vocab_size_divisible_by;
    recorded in the checkpoint, where export, compare and the trainer read it)."""


def hf_config_dtype(cfg: dict) -> str:
    """The dtype the HF config declares (transformers 5 writes `dtype`, 4.x `torch_dtype`); float32 if none."""
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return d if d in DTYPES else "float32"


def _embedding_hf_name(registry) -> str:
    return next(m.hf[0] for m in registry.mappings if m.megatron.endswith("embedding.word_embeddings.weight"))


def check_tied_head(reader, registry) -> None:
    """A tied checkpoint may store lm_head.weight anyway; it must then be the embedding, or dropping it would
    silently change the model."""
    import torch

    if "lm_head.weight" not in reader:
        return
    emb_name = _embedding_hf_name(registry)
    head, emb = reader.get("lm_head.weight"), reader.get(emb_name)
    try:
        if head.shape != emb.shape or head.dtype != emb.dtype or not torch.equal(head, emb):
            raise CheckpointError(f"{reader.dir}: config.json sets tie_word_embeddings but lm_head.weight differs "
                                  f"from {emb_name} (set tie_word_embeddings to false to convert it as an untied "
                                  f"model)")
    finally:
        reader.release("lm_head.weight")
        reader.release(emb_name)


def check_hf_tensors(reader, registry, tied: bool) -> None:
    """Every tensor the model needs is present; every tensor present maps somewhere (no silent drops)."""
    present = set(reader.keys())
    for name in registry.hf_names():
        if name not in present:
            raise CheckpointError(f"{reader.dir}: tensor '{reader_name(reader, name)}' is missing from the "
                                  f"checkpoint")
    for name in sorted(present):
        if tied and name == "lm_head.weight":
            continue  # checked against the embedding by check_tied_head
        try:
            registry.for_hf(name)
        except MappingError as e:
            raise MappingError(f"{reader.dir}: {e} (no Megatron parameter to put it in)") from None
    if tied:
        check_tied_head(reader, registry)


def reader_name(reader, name: str) -> str:
    """A canonical tensor name as the checkpoint's own scheme spells it (for messages)."""
    if reader.naming is None or reader.scheme is None:
        return name
    return reader.naming.to_scheme(name, reader.scheme)


def plan_hf_to_megatron(hf_dir, out, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                        force: bool = False, progress: bool = True, vocab_divisible_by: int = 128) -> ImportPlan:
    """Validate everything that can be validated without ranks; raises ModelSpecError/CheckpointError/..."""
    if tp < 1 or pp < 1:
        raise ModelSpecError(f"TP and PP must be >= 1 (got TP {tp}, PP {pp})")
    if vocab_divisible_by < 1:
        raise ModelSpecError(f"the vocab padding divisor must be >= 1 (got {vocab_divisible_by})")
    family, shape = load_family(hf_dir)
    family.check_layout(shape, tp, pp, vocab_divisible_by)
    if dtype is not None and dtype not in DTYPES:
        raise ModelSpecError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    reader = family.open_hf(hf_dir, shape)
    check_hf_tensors(reader, family.mappings(shape, vocab_divisible_by), shape.tie_word_embeddings)
    out_path = atomic.check_output_dir(out, force)
    return ImportPlan(hf_dir=str(Path(hf_dir).absolute()), out=str(out_path), tp=tp, pp=pp,
                      dtype=dtype or hf_config_dtype(read_hf_config(hf_dir)), force=force, progress=progress,
                      vocab_divisible_by=vocab_divisible_by)


def build_stage_for_loading(family, shape, dtype: str, vocab_divisible_by: int = 128):
    """This rank's stage without random initialisation (every parameter is loaded right after)."""
    return family.build_stage(shape, dtype, init_weights=False, divisible_by=vocab_divisible_by)


def build_skeleton(family, shape, dtype: str, vocab_divisible_by: int = 128):
    """This rank's stage on the meta device: its parameters' shapes and sharded layout, no memory."""
    import torch

    with torch.device("meta"):
        return family.build_stage(shape, dtype, init_weights=False, divisible_by=vocab_divisible_by)


class Scratch:
    """One reusable buffer for parameter-shaped temporaries (its pages are faulted in once, not per tensor)."""

    def __init__(self):
        import torch

        self._buf = torch.empty(0, dtype=torch.uint8)

    def take(self, shape, dtype):
        import torch

        n = 1
        for d in shape:
            n *= d
        nbytes = n * dtype.itemsize
        if nbytes > self._buf.numel():
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes].view(dtype).view(tuple(shape))

    @property
    def nbytes(self) -> int:
        return self._buf.numel()


def direct_pieces(mapping, hf_names: list, reader, tp_rank: int, tp_size: int, param, views: list,
                  min_bytes: int) -> list:
    """Per ShardView: the Pieces of HF files its chunk consists of (whole rows, same dtype, at least `min_bytes`),
    or None where the chunk has to be assembled (row_pieces says which layouts qualify)."""
    from spark_megatron.checkpoint.row_pieces import import_pieces, shard_row_sources, view_rows
    from spark_megatron.models.layout import hf_shapes

    shape = tuple(param.shape)
    infos = [reader.info(h) for h in hf_names]
    shapes = hf_shapes(mapping, shape, tp_size)
    if any(i.dtype != param.dtype for i in infos) or [tuple(i.shape) for i in infos] != [tuple(x) for x in shapes]:
        return [None] * len(views)  # assembled (mismatches are named there)
    sources = shard_row_sources(mapping, shape, tp_rank, tp_size)
    row_bytes = param.dtype.itemsize
    for d in shape[1:]:
        row_bytes *= d
    out = []
    for v in views:
        rows = view_rows(v, shape)
        if sources is None or rows is None or rows[1] * row_bytes < min_bytes:
            out.append(None)
        else:
            out.append(import_pieces(sources, rows, hf_names, reader, row_bytes))
    return out


def stream_stage(stage, views: dict, reader, registry, tied: bool, writer, bar) -> tuple:
    """For each parameter this rank stores, append its chunks to `writer`: straight from the HF files where a chunk
    is made of whole HF rows (one copy), else through the scratch buffer filled with the TP shard; then drop the
    HF pages read. Returns (bytes of HF tensor data read, scratch bytes)."""
    from spark_megatron.models.weights import mapping_for, tp_rank_and_size, fill_shard, global_param_names

    tp_rank, tp_size = tp_rank_and_size()
    scratch, nbytes = Scratch(), 0
    for (local, param), (name, _) in zip(stage.named_parameters(), global_param_names(stage)):
        mine = views.get(local)
        if not mine:
            continue  # a replica another rank stores (TP-replicated norms, a tied output layer)
        mapping, layer = mapping_for(registry, name, tied)
        hf_names = list(mapping.resolve(layer)[1])
        direct = direct_pieces(mapping, hf_names, reader, tp_rank, tp_size, param, mine, writer.MIN_PIECES_BYTES)
        buf = None
        for v, pieces in zip(mine, direct):
            if pieces is not None:
                writer.add_pieces(v.key, v.global_shape, v.global_offset, v.chunk_shape, param.dtype, pieces)
                continue
            if buf is None:
                buf = scratch.take(param.shape, param.dtype)
                fill_shard(buf, [reader.get(h) for h in hf_names], mapping, tp_rank, tp_size, name, hf_names)
            writer.add_tensor(v.key, v.global_shape, v.global_offset, v.of(buf).view(v.chunk_shape))
        for h in hf_names:
            nbytes += reader.info(h).nbytes
            reader.release(h)
        bar.update(len(hf_names))
    return nbytes, scratch.nbytes


def _write_rank_files(tmp: Path, stage, views: dict, objects: list, reader, registry, tied: bool, bar,
                      stats: dict) -> None:
    """Collective: every rank writes its .distcp file; rank 0 writes the dist-checkpoint metadata."""
    import torch.distributed as dist

    from spark_megatron.checkpoint.dcp_files import DistcpWriter, write_metadata

    writer = DistcpWriter(tmp, dist.get_rank())
    status, record = None, None
    try:
        stats["bytes_read"], stats["scratch_bytes"] = stream_stage(stage, views, reader, registry, tied, writer,
                                                                   bar)
        for key, payload in objects:
            writer.add_object(key, payload)
        record = writer.close()
    except launcher.USER_ERRORS as e:
        writer.abort()
        status = launcher.error_value(e)
    launcher.agree(status)
    stats["bytes_written"] = record.bytes_written
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        write_metadata(tmp, records)


def _import_rank(rank: int, world: int, plan: ImportPlan) -> dict:
    """One rank: skeleton stage, stream its chunks to its file, publish collectively. Returns timings (s) and
    memory (bytes)."""
    from tqdm import tqdm

    from spark_megatron.checkpoint.megatron_format import stage_shard_views
    from spark_megatron.parallel.groups import init_distributed

    t0 = time.perf_counter()
    launcher.quiet_known_warnings()
    init_distributed(plan.tp, plan.pp)
    launcher.reset_peak_rss()
    rss_after_init = launcher.memory_stats()["rss_bytes"]
    t_init = time.perf_counter()
    family, shape = load_family(plan.hf_dir)
    stage = build_skeleton(family, shape, plan.dtype, plan.vocab_divisible_by)
    views, objects = stage_shard_views(stage)
    registry = family.mappings(shape, plan.vocab_divisible_by)
    t_build = time.perf_counter()
    reader = family.open_hf(plan.hf_dir, shape)
    total = sum(len(_mapping_hf(registry, n, shape.tie_word_embeddings)) for n, _ in _stored(stage, views))
    bar = tqdm(total=total, unit="tensor", desc="hf->megatron", disable=not (plan.progress and rank == 0))
    meta = CheckpointMeta(family=family.name, hf_config=read_hf_config(plan.hf_dir),
                          padded_vocab_size=padded_vocab_size(shape.vocab_size, plan.vocab_divisible_by, plan.tp),
                          vocab_divisible_by=plan.vocab_divisible_by, dtype=plan.dtype, tp=plan.tp, pp=plan.pp,
                          hf_naming=reader.scheme)
    stats: dict = {}
    try:
        write_checkpoint(plan.out, meta, lambda tmp: _write_rank_files(
            tmp, stage, views, objects, reader, registry, shape.tie_word_embeddings, bar, stats),
            aux_from=plan.hf_dir, force=plan.force)
    except launcher.USER_ERRORS as e:
        return launcher.error_value(e)
    finally:
        bar.close()
    t_save = time.perf_counter()
    return {"init_s": t_init - t0, "build_s": t_build - t_init, "write_s": t_save - t_build,
            "rss_after_init_bytes": rss_after_init, "peak_rss_bytes": launcher.memory_stats()["peak_rss_bytes"],
            **stats}


def _stored(stage, views: dict):
    from spark_megatron.models.weights import global_param_names

    return [(name, p) for (local, _), (name, p) in zip(stage.named_parameters(), global_param_names(stage))
            if views.get(local)]


def _mapping_hf(registry, name: str, tied: bool) -> tuple:
    from spark_megatron.models.weights import mapping_for

    mapping, layer = mapping_for(registry, name, tied)
    return mapping.resolve(layer)[1]


def convert_hf_to_megatron(hf_dir, out, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                           force: bool = False, progress: bool = True, timeout_s: float = 3600,
                           vocab_divisible_by: int = 128) -> list:
    """Convert an HF checkpoint to a Megatron checkpoint saved at TP x PP; returns per-rank timings.
    `vocab_divisible_by`: the training recipe's parallel.make_vocab_size_divisible_by (a checkpoint padded with
    another divisor does not load into that trainer's stage).

    Raises ModelSpecError / MappingError / CheckpointError (one-line messages) and leaves no output on failure;
    KeyboardInterrupt when interrupted (the ranks are stopped first).
    """
    plan = plan_hf_to_megatron(hf_dir, out, tp, pp, dtype, force, progress, vocab_divisible_by)
    try:
        return launcher.run_layout(_import_rank, tp * pp, plan, timeout_s=timeout_s)
    finally:
        if not launcher.under_torchrun():  # pids of other nodes' writers mean nothing here
            atomic.remove_stale_temps(plan.out)
