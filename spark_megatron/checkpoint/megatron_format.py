"""The project's Megatron checkpoint format, shared by conversion and the trainer.

A directory holds:
- a `megatron.core.dist_checkpointing` checkpoint (torch_dist backend) whose top-level sharded state dict is
  `{"model": stage.sharded_state_dict()}` (one key per model chunk, `model0..` under virtual pipelining) plus
  whatever the trainer adds beside it ("optimizer", ...); dist_checkpointing stores tensors by global key, so
  the checkpoint loads at any TP/PP whose padded vocab matches;
- `spark_meta.json` (:class:`CheckpointMeta`): family, the full HF config, the layout it was saved at, ...;
- copies of the HF tokenizer / generation / processor files, so HF export needs nothing but this directory.

Every rank calls save/load; the directory appears atomically (temp dir + rename by rank 0 after a barrier).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from spark_megatron.checkpoint import atomic
from spark_megatron.models.weights import CheckpointError

FORMAT_VERSION = 1
META_FILE = "spark_meta.json"
AUX_FILE_PATTERNS = ("tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                     "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                     "processor_config.json", "chat_template*")
"""HF side files copied verbatim next to the weights (everything a loader needs except config and tensors)."""


@dataclass
class CheckpointMeta:
    """What `spark_meta.json` records about a Megatron checkpoint."""

    family: str
    """ModelFamily name (e.g. 'qwen2'); the HF config's architecture picks the family on load."""
    hf_config: dict
    """The full HF config.json dict of the model (written back verbatim on HF export)."""
    padded_vocab_size: int
    """Rows of the Megatron embedding/output layer (true vocab padded); must match the loading layout."""
    dtype: str
    """Parameter dtype the tensors were saved in: float32 | bfloat16 | float16."""
    tp: int = 1
    """Tensor-parallel size at save time (informational: loading reshards)."""
    pp: int = 1
    """Pipeline-parallel size at save time (informational: loading reshards)."""
    step: Optional[int] = None
    """Training step of a trainer checkpoint; None for a conversion."""
    vocab_divisible_by: int = 128
    """The divisor the vocab was padded to a multiple of (`parallel.make_vocab_size_divisible_by`; conversion:
    `--make-vocab-size-divisible-by`). A trainer or tool that loads the checkpoint builds its stage with it."""
    hf_naming: Optional[str] = None
    """Tensor-name scheme of the HF checkpoint this was converted from (e.g. 'hub' or 'transformers' for
    Qwen2.5-VL); HF export writes it back unless told otherwise. None: the family's default."""
    extra: dict = field(default_factory=dict)
    """Trainer-owned JSON-serialisable fields (consumed samples, data cursor, ...)."""
    format_version: int = FORMAT_VERSION
    """Version of this directory layout."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)


def read_meta(ckpt_dir) -> CheckpointMeta:
    """Read and validate `spark_meta.json`; CheckpointError naming the file on any problem."""
    path = Path(ckpt_dir) / META_FILE
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"{ckpt_dir}: Megatron checkpoint directory does not exist")
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {META_FILE} (not a spark_megatron Megatron checkpoint)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (this code reads "
                              f"{FORMAT_VERSION})")
    known = {f.name for f in dataclasses.fields(CheckpointMeta)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown field '{unknown[0]}'")
    try:
        return CheckpointMeta(**raw)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from None


def copy_aux_files(src_dir, dst_dir) -> list:
    """Copy tokenizer / generation / processor files from an HF (or Megatron) dir; returns the names copied."""
    src, dst = Path(src_dir), Path(dst_dir)
    copied = []
    for pattern in AUX_FILE_PATTERNS:
        for p in sorted(src.glob(pattern)):
            if p.is_file() and p.name not in copied:
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    return copied


def model_state_keys(chunks) -> list:
    """Top-level keys of the model chunks: ['model'] for one stage, ['model0', 'model1', ...] for VPP."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _as_chunks(stage) -> list:
    return list(stage) if isinstance(stage, (list, tuple)) else [stage]


def module_sharded_state_dict(module, prefix: str = "", metadata: Optional[dict] = None) -> dict:
    """`module.sharded_state_dict()` where it exists; for a plain torch module composed of megatron parts (e.g.
    a VL stage wrapping a vision tower and a GPTModel) the same recursively: each child with its own sharded
    layout, the module's direct parameters as replicated tensors. (megatron's `sharded_state_dict_default`
    would instead treat a plain child's TP-sharded parameters as replicated.)"""
    if hasattr(module, "sharded_state_dict"):
        return module.sharded_state_dict(prefix=prefix, metadata=metadata)
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    own: dict = {}
    module._save_to_state_dict(own, "", keep_vars=True)  # direct parameters and persistent buffers only
    out = make_sharded_tensors_for_checkpoint(own, prefix, tp_group=ps.get_tensor_model_parallel_group(),
                                              dp_cp_group=metadata["dp_cp_group"])
    for name, child in module.named_children():
        out.update(module_sharded_state_dict(child, f"{prefix}{name}.", metadata))
    return out


def model_sharded_state_dict(stage) -> dict:
    chunks = _as_chunks(stage)
    return {k: module_sharded_state_dict(c) for k, c in zip(model_state_keys(chunks), chunks)}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast(obj):
    """Rank 0's value on every rank (identity outside torch.distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def prepare_temp_dir(out_dir, force: bool):
    """Rank 0 validates the output and creates the temp dir; every rank gets the path or the same error."""
    result = None
    if _rank() == 0:
        try:
            out = atomic.check_output_dir(out_dir, force)
            atomic.remove_stale_temps(out)
            tmp = atomic.temp_dir_for(out)
            atomic.discard(tmp)
            tmp.mkdir()
            result = ("ok", str(tmp))
        except CheckpointError as e:
            result = ("error", type(e).__name__, str(e))
    result = _broadcast(result)
    if result[0] == "error":
        raise (atomic.OutputExistsError if result[1] == "OutputExistsError" else CheckpointError)(result[2])
    return Path(result[1])


def write_checkpoint(out_dir, meta: CheckpointMeta, write, aux_from=None, force: bool = False,
                     before_commit=None, after_commit=None) -> Path:
    """All ranks: `write(temp_dir)` fills the temp dir collectively (tensor files and dist-checkpoint metadata);
    rank 0 then adds spark_meta.json and the aux files and publishes the directory atomically.

    Rank 0 runs `before_commit(temp_dir)` (e.g. a completion marker) before the atomic rename and
    `after_commit(out_dir)` after it; an OSError/CheckpointError in either fails the save on every rank.
    """
    tmp = prepare_temp_dir(out_dir, force)
    status = ("ok", "")
    try:
        write(tmp)
        _barrier()
        if _rank() == 0:
            try:
                (tmp / META_FILE).write_text(meta.to_json())
                if aux_from:
                    copy_aux_files(aux_from, tmp)
                if before_commit is not None:
                    before_commit(tmp)
                atomic.commit(tmp, out_dir, force)
                if after_commit is not None:
                    after_commit(Path(out_dir))
            except (OSError, CheckpointError) as e:
                status = ("error", f"{out_dir}: could not publish checkpoint ({e})")
        status = _broadcast(status)
    except BaseException:
        if _rank() == 0:
            atomic.discard(tmp)
        raise
    if status[0] == "error":
        if _rank() == 0:
            atomic.discard(tmp)
        raise CheckpointError(status[1])
    return Path(out_dir)


def save_sharded_checkpoint(sharded_state_dict: dict, out_dir, meta: CheckpointMeta, aux_from=None,
                            force: bool = False, before_commit=None, after_commit=None) -> Path:
    """Save any sharded state dict (the trainer adds 'optimizer' etc. beside 'model') in this format through
    `dist_checkpointing.save`. All ranks call; see `write_checkpoint` for the publish hooks."""
    from megatron.core import dist_checkpointing

    return write_checkpoint(out_dir, meta, lambda tmp: dist_checkpointing.save(sharded_state_dict, str(tmp)),
                            aux_from, force, before_commit, after_commit)


# --------------------------------------------------------------------- where each parameter lives in the file

@dataclass(frozen=True)
class ShardView:
    """One ShardedTensor of a parameter: the region of the parameter it covers (a strided view) and where that
    region sits in the checkpoint's global tensor `key`."""

    key: str
    global_shape: tuple
    global_offset: tuple
    """Offsets in the global tensor, prepended (layer) axes included."""
    chunk_shape: tuple
    """The stored chunk's shape: size-1 prepended axes, then the view's shape."""
    size: tuple
    stride: tuple
    storage_offset: int
    """Of the view, relative to the parameter's first element."""

    def of(self, param_like: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
        """The same region of a contiguous tensor shaped like the parameter."""
        return param_like.as_strided(self.size, self.stride, param_like.storage_offset() + self.storage_offset)


def stage_shard_views(stage, main_replicas_only: bool = True) -> tuple:
    """A stage's parameters as megatron's sharded state dict lays them out in a checkpoint:
    ({local parameter name: [ShardView, ...]}, [(ShardedObject unique key, [data, ...]), ...]).

    Factories (e.g. the gated MLP's gate/up halves) are applied; with `main_replicas_only`, only what this rank
    stores when saving is listed (a TP-replicated norm on TP rank 0 only, a tied output layer nowhere). Works on a
    skeleton built on the meta device: only shapes, strides and storage identities are read.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (ShardedObject, ShardedTensor, ShardedTensorFactory,
                                                          is_main_replica)

    params = dict(stage.named_parameters()) if not isinstance(stage, (list, tuple)) else \
        {f"{i}.{n}": p for i, c in enumerate(stage) for n, p in c.named_parameters()}
    owner = {p.untyped_storage()._cdata: n for n, p in params.items()}
    views, objects = {}, {}
    items = []
    for v in nested_values(model_sharded_state_dict(stage)):
        items.extend(nested_values(v.build()) if isinstance(v, ShardedTensorFactory) else [v])
    for st in items:
        if main_replicas_only and not is_main_replica(st.replica_id):
            continue
        if isinstance(st, ShardedObject):
            objects.setdefault(st.unique_key, []).append(st.data)
            continue
        if not isinstance(st, ShardedTensor) or st.flattened_range is not None:
            raise CheckpointError(f"{getattr(st, 'key', st)}: unsupported sharded entry for direct conversion")
        name = owner.get(st.data.untyped_storage()._cdata)
        if name is None:
            raise CheckpointError(f"{st.key}: sharded tensor that is no parameter of the stage")
        rel = st.data.storage_offset() - params[name].storage_offset()
        views.setdefault(name, []).append(ShardView(
            st.key, tuple(st.global_shape), tuple(st.global_offset),
            (1,) * st.prepend_axis_num + tuple(st.local_shape), tuple(st.data.shape), tuple(st.data.stride()), rel))
    return views, list(objects.items())


def current_layout() -> tuple:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def save_megatron_checkpoint(stage, out_dir, meta: CheckpointMeta, aux_from=None, force: bool = False) -> Path:
    """Save this rank's model stage (or list of VPP chunks); `meta.tp/pp` are set from the parallel state."""
    meta.tp, meta.pp = current_layout()
    return save_sharded_checkpoint(model_sharded_state_dict(stage), out_dir, meta, aux_from, force)


def _local_padded_vocab(chunks) -> Optional[int]:
    """Padded vocab of this rank's stage (None on stages without embedding or output layer)."""
    tp, _ = current_layout()
    for c in chunks:
        for attr in ("embedding", "output_layer"):
            mod = getattr(c, attr, None)
            if mod is None:
                continue
            weight = mod.word_embeddings.weight if attr == "embedding" else mod.weight
            if weight is not None:
                return weight.shape[0] * tp
    return None


def _mismatch(sharded: dict, ckpt_dir, meta: CheckpointMeta, chunks) -> Optional[str]:
    """This rank's reason the checkpoint cannot fill its stage (None if it can), found from metadata only."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    local_vocab = _local_padded_vocab(chunks)
    if local_vocab is not None and local_vocab != meta.padded_vocab_size:
        return (f"{ckpt_dir}: saved with padded vocab {meta.padded_vocab_size}, this layout pads to "
                f"{local_vocab} (choose a TP that divides the padding unit)")
    try:
        stored = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is one user-facing error
        return f"{ckpt_dir}: unreadable dist-checkpoint metadata ({type(e).__name__}: {str(e)[:200]})"
    for item in nested_values(sharded):
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            continue
        if item.key not in stored:
            return f"{ckpt_dir}: tensor '{item.key}' is not in the checkpoint (a different model?)"
        if isinstance(item, ShardedTensor) and not item.allow_shape_mismatch \
                and tuple(stored[item.key].global_shape) != tuple(item.global_shape):
            return (f"{ckpt_dir}: tensor '{item.key}' has shape {tuple(stored[item.key].global_shape)} in the "
                    f"checkpoint, the model expects {tuple(item.global_shape)}")
    return None


def _first_error_everywhere(reason: Optional[str]) -> Optional[str]:
    """Collective: the first rank's error reason on every rank, so all ranks skip the collective load together."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reason
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r), None)


def load_megatron_checkpoint(stage, ckpt_dir) -> CheckpointMeta:
    """Load the model part of a checkpoint into this rank's stage at the current TP/PP; returns its meta.

    All ranks call. Other top-level entries (optimizer, ...) are ignored, so a trainer checkpoint loads
    model-only here. A checkpoint that does not fit the stage raises CheckpointError on every rank (checked
    collectively from metadata first, so no rank is left waiting inside the collective load).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    meta = read_meta(ckpt_dir)
    chunks = _as_chunks(stage)
    sharded = model_sharded_state_dict(chunks)
    reason = _first_error_everywhere(_mismatch(sharded, ckpt_dir, meta, chunks))
    if reason:
        raise CheckpointError(reason)
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    for key, chunk in zip(model_state_keys(chunks), chunks):
        chunk.load_state_dict(loaded[key], strict=True)
    return meta
