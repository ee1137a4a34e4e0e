"""Numerical check of a Megatron checkpoint against the HF model it should equal.

Both models run the same seeded random tokens; the report holds the max |diff| of the logits and of every
layer's hidden state (parity.compare_stage), at any TP/PP the checkpoint can be loaded at.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spark_megatron.checkpoint import launcher
from spark_megatron.checkpoint.hf_import import build_stage_for_loading
from spark_megatron.checkpoint.megatron_format import load_megatron_checkpoint, read_meta
from spark_megatron.models.families import family_for_config, load_family
from spark_megatron.models.qwen2 import ModelSpecError


@dataclass
class ComparePlan:
    """A validated comparison (picklable: every rank receives it)."""

    hf_dir: str
    ckpt_dir: str
    tp: int
    pp: int
    seq_len: int
    batch: int
    seed: int
    """Seed of the random token ids (identical on every rank)."""


def plan_compare(hf_dir, ckpt_dir, tp: int = 1, pp: int = 1, seq_len: int = 32, batch: int = 2,
                 seed: int = 0) -> ComparePlan:
    if tp < 1 or pp < 1 or seq_len < 1 or batch < 1:
        raise ModelSpecError(f"TP, PP, seq-len and batch must be >= 1 (got {tp}, {pp}, {seq_len}, {batch})")
    hf_family, hf_shape = load_family(hf_dir)
    meta = read_meta(ckpt_dir)
    family = family_for_config(meta.hf_config, str(Path(ckpt_dir) / "spark_meta.json"))
    shape = family.shape_from_hf_dict(meta.hf_config)
    if family.name != hf_family.name or shape != hf_shape:
        raise ModelSpecError(f"{hf_dir} and {ckpt_dir} describe different models ({hf_family.name} {hf_shape} vs "
                             f"{family.name} {shape})")
    if not family.hf_model_class.endswith("ForCausalLM"):  # parity.compare_stage feeds text tokens only
        raise ModelSpecError(f"compare supports text models (*ForCausalLM); '{family.name}' "
                             f"({family.hf_model_class}) needs its own parity check")
    family.check_layout(shape, tp, pp)
    return ComparePlan(str(Path(hf_dir).absolute()), str(Path(ckpt_dir).absolute()), tp, pp, seq_len, batch, seed)


def random_tokens(vocab_size: int, batch: int, seq_len: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


def _compare_rank(rank: int, world: int, plan: ComparePlan):
    import torch
    import transformers

    from spark_megatron.models.parity import compare_stage
    from spark_megatron.parallel.groups import init_distributed

    launcher.quiet_known_warnings()
    init_distributed(plan.tp, plan.pp)
    try:
        meta = read_meta(plan.ckpt_dir)
        family = family_for_config(meta.hf_config)
        shape = family.shape_from_hf_dict(meta.hf_config)
        stage = build_stage_for_loading(family, shape, meta.dtype)
        load_megatron_checkpoint(stage, plan.ckpt_dir)  # raises on every rank alike
    except launcher.USER_ERRORS as e:
        return launcher.error_value(e)
    hf_cls = getattr(transformers, family.hf_model_class)
    hf_model = hf_cls.from_pretrained(plan.hf_dir, dtype=getattr(torch, meta.dtype)).eval()
    tokens = random_tokens(shape.vocab_size, plan.batch, plan.seq_len, plan.seed)
    return compare_stage(stage, hf_model, tokens, shape.vocab_size)


def compare_checkpoints(hf_dir, ckpt_dir, tp: int = 1, pp: int = 1, seq_len: int = 32, batch: int = 2,
                        seed: int = 0, timeout_s: float = 3600):
    """Load the Megatron checkpoint at TP x PP and diff it against HF transformers; returns a ParityReport."""
    plan = plan_compare(hf_dir, ckpt_dir, tp, pp, seq_len, batch, seed)
    results = launcher.run_layout(_compare_rank, tp * pp, plan, timeout_s=timeout_s)
    return next(r for r in results if r is not None)
