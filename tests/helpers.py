"""Shared test fixtures: tiny HF checkpoints built once per test session, and small checks others can reuse.

Checkpoints are memoised per process (pytest runs every test module in one process), so each tiny model is
written once however many modules ask for it. Importable from spawned ranks (no pytest needed at import).
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

TINY_SPECS = {
    "untied": dict(tie_word_embeddings=False, seed=0),
    "tied": dict(tie_word_embeddings=True, seed=1),
    "untied_other_seed": dict(tie_word_embeddings=False, seed=7),
}
"""Named TinyQwen2Spec overrides: 4 layers, 4 heads, 2 KV groups (GQA), head_dim 32, vocab 441 (padded 512)."""

_ROOT = None
_CACHE: dict = {}


def session_dir() -> Path:
    """A per-process scratch root removed at exit."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="spark_test_"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def tiny_hf_checkpoint(kind: str = "untied") -> Path:
    """Path of a tiny random HF checkpoint (written on first use; treat as read-only): a TINY_SPECS Qwen2,
    kind='vl' for the default tiny Qwen2.5-VL, or 'vl_odd_mlp' for one whose vision MLP width (97) Megatron
    zero-pads (to 128)."""
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2

    if kind not in _CACHE:
        if kind in ("vl", "vl_odd_mlp"):
            from spark_megatron.models.tiny_vl_checkpoint import TinyQwen25VLSpec, write_tiny_qwen2_5_vl

            spec = TinyQwen25VLSpec(vision_intermediate_size=97 if kind == "vl_odd_mlp" else 128)
            _CACHE[kind] = write_tiny_qwen2_5_vl(session_dir() / f"hf_{kind}", spec)
        else:
            _CACHE[kind] = write_tiny_qwen2(session_dir() / f"hf_{kind}", TinyQwen2Spec(**TINY_SPECS[kind]))
    return _CACHE[kind]


try:  # fixtures for test modules: `from tests.helpers import tiny_untied_hf` makes them available there
    import pytest

    @pytest.fixture(scope="session")
    def tiny_untied_hf() -> Path:
        return tiny_hf_checkpoint("untied")

    @pytest.fixture(scope="session")
    def tiny_tied_hf() -> Path:
        return tiny_hf_checkpoint("tied")
except ImportError:  # spawned ranks never need the fixtures
    pass


def copy_checkpoint(src, dst) -> Path:
    """A writable copy of a checkpoint dir (for tests that damage it)."""
    shutil.copytree(src, dst)
    return Path(dst)


def edit_config(hf_dir, **changes) -> None:
    path = Path(hf_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def leftovers(out) -> list:
    """The output dir and any temp/backup siblings of it that exist (a failed write must leave none)."""
    out = Path(out).absolute()
    found = [out] if out.exists() else []
    return found + sorted(out.parent.glob(f"{out.name}.tmp-*")) + sorted(out.parent.glob(f"{out.name}.old-*"))


def random_tokens(vocab_size: int, batch: int = 2, seq_len: int = 24, seed: int = 0):
    import torch

    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def hf_model(hf_dir, dtype: str = "float32"):
    """The transformers oracle model of a checkpoint dir, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=getattr(torch, dtype)).eval()


def megatron_logits_at(ckpt_dir, tp: int, pp: int, tokens):
    """Inside a spawned rank: load a Megatron checkpoint at TP x PP and return full-vocab logits
    (on the last pipeline stage's ranks; None elsewhere)."""
    from spark_megatron.checkpoint.megatron_format import load_megatron_checkpoint, read_meta
    from spark_megatron.models.families import family_for_config
    from spark_megatron.models.parity import megatron_forward
    from spark_megatron.parallel.groups import init_distributed

    init_distributed(tp, pp)
    meta = read_meta(ckpt_dir)
    family = family_for_config(meta.hf_config)
    shape = family.shape_from_hf_dict(meta.hf_config)
    stage = family.build_stage(shape, meta.dtype)
    load_megatron_checkpoint(stage, ckpt_dir)
    logits, _ = megatron_forward(stage, tokens, shape.vocab_size)
    return logits


class TableEngine:
    """Minimal in-process engine for weight-push tests: destination tensors shaped like `pairs`, its validation
    table, and the names each loaded bucket held (in load order)."""

    def __init__(self, pairs, where: str = "table engine"):
        import torch

        from spark_megatron.sync import ExpectedWeights, TensorSpec

        self.dest = {n: torch.zeros_like(t) for n, t in pairs}
        self.expected = ExpectedWeights({n: TensorSpec.of(n, t) for n, t in pairs}, where=where)
        self.loaded, self.policy_version, self.stale = [], 0, None

    def expected_weights(self):
        return self.expected

    def begin_update(self, version):
        pass

    def load_bucket(self, named):
        self.loaded.append([n for n, _ in named])
        for n, t in named:
            self.dest[n].copy_(t)

    def finish_update(self, version):
        self.policy_version = version

    def abort_update(self, reason, dirty):
        self.stale = reason if dirty else None


def loaded_qwen2_stage(hf_dir):
    """Inside a spawned rank (parallel state initialised): this rank's Qwen2 stage with the HF weights loaded
    -> (shape, mapping registry, stage)."""
    from spark_megatron.models.qwen2 import TextModelShape, build_stage
    from spark_megatron.models.qwen2_mapping import qwen2_mappings
    from spark_megatron.models.weights import HFCheckpointReader, load_hf_weights

    shape = TextModelShape.from_hf_dir(hf_dir)
    registry = qwen2_mappings(shape)
    stage = build_stage(shape)
    load_hf_weights(stage, HFCheckpointReader(hf_dir), registry, shape.tie_word_embeddings)
    return shape, registry, stage
