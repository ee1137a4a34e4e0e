"""Numerical check of a Megatron checkpoint against the HF model it should equal.

Both models run the same seeded random tokens; the report holds the max |diff| of the logits and of every
layer's hidden state (parity.compare_stage), at any TP/PP the checkpoint can be loaded at. Qwen2.5-VL rows start
with a seeded random image (two sizes across the batch rows, so two grids), processed by the checkpoint's image
processor: the vision tower, the merger, the image scatter and mRoPE are all in the comparison.
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
    if hasattr(shape, "image_token_id"):
        inputs = vl_inputs(plan.hf_dir, shape, tokens, plan.seed)
        return compare_stage(stage, hf_model, inputs, shape.vocab_size)
    return compare_stage(stage, hf_model, tokens, shape.vocab_size)


def vl_inputs(hf_dir: str, shape, text: "torch.Tensor", seed: int):  # noqa: F821
    """ParityInputs for a VL model: row i = <|vision_start|> image_i <|vision_end|> + text[i] (vision special
    ids in `text` are replaced, so every placeholder belongs to an image). Images: seeded random RGB, two sizes
    alternating over the rows."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoTokenizer

    from spark_megatron.models.parity import ParityInputs
    from spark_megatron.models.qwen2_5_vl import mrope_position_ids
    from spark_megatron.rollout.engine import vision_token_ids
    from spark_megatron.vision import ImagePreprocessor

    pre, tok = ImagePreprocessor(hf_dir), AutoTokenizer.from_pretrained(hf_dir)
    rng = np.random.default_rng(seed)
    sizes = [(2 * pre.factor, 3 * pre.factor), (3 * pre.factor, 2 * pre.factor)]
    images = [pre.prepare(Image.fromarray(rng.integers(0, 255, sizes[i % 2] + (3,), dtype=np.uint8)),
                          source=f"random image {i}") for i in range(text.shape[0])]
    special = torch.tensor(vision_token_ids(tok))
    text = torch.where(torch.isin(text, special), torch.zeros_like(text), text)
    start, end = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
    rows = [[start] + [shape.image_token_id] * im.num_tokens + [end] + text[i].tolist() for i, im in enumerate(images)]
    width = max(len(r) for r in rows)  # equal within a size; pad the shorter rows at the front with text
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    grids = torch.tensor([im.grid_thw for im in images], dtype=torch.long)
    pixels = torch.cat([im.pixel_values for im in images])
    pos = mrope_position_ids(ids, grids, shape.image_token_id, shape.vision.spatial_merge_size)
    return ParityInputs(ids, pos, {"pixel_values": pixels, "image_grid_thw": grids},
                        {"pixel_values": pixels, "image_grid_thw": grids,
                         "mm_token_type_ids": (ids == shape.image_token_id).int()})


def compare_checkpoints(hf_dir, ckpt_dir, tp: int = 1, pp: int = 1, seq_len: int = 32, batch: int = 2,
                        seed: int = 0, timeout_s: float = 3600):
    """Load the Megatron checkpoint at TP x PP and diff it against HF transformers; returns a ParityReport."""
    plan = plan_compare(hf_dir, ckpt_dir, tp, pp, seq_len, batch, seed)
    results = launcher.run_layout(_compare_rank, tp * pp, plan, timeout_s=timeout_s)
    return next(r for r in results if r is not None)
