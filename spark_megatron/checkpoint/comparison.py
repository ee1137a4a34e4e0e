"""Numerical check of a Megatron checkpoint against the HF model it should equal.

Both models run the same seeded random tokens; the report holds the max |diff| of the logits and of every
layer's hidden state (parity.output_diffs), at any TP/PP the checkpoint can be loaded at. Qwen2.5-VL rows start
with a seeded random image (two sizes across the batch rows, each spanning several attention windows and not a
multiple of the window), processed by the checkpoint's image processor: the vision tower's windowed and full
attention, the merger, the image scatter and mRoPE are all in the comparison.

How a difference is judged depends on the checkpoint's dtype. float32: max |megatron - hf| against an absolute
tolerance (two float32 implementations agree to ~1e-6). bfloat16 / float16: two implementations that round
differently cannot agree to any fixed tolerance, so the yardstick is measured in the same run on the same inputs:
the HF model's own rounding error, HF at the checkpoint dtype vs HF in float32. Both are measured per output as the
worst position's relative L2 difference (||a - b|| / ||b|| over the hidden or vocab dim): a max abs difference is
dominated by the largest activations, whose rounding error can hide a wrong tensor that changes smaller ones (a
swapped KV head went unseen that way on random weights). The Megatron-vs-HF difference (both at the checkpoint
dtype) passes when it is within `multiple` times HF's own, for every output.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from spark_megatron.checkpoint import launcher
from spark_megatron.checkpoint.hf_import import build_stage_for_loading
from spark_megatron.checkpoint.megatron_format import load_megatron_checkpoint, read_meta
from spark_megatron.models.families import family_for_config, load_family, read_hf_config
from spark_megatron.models.parity import ParityReport
from spark_megatron.models.qwen2 import ModelSpecError

DEFAULT_TOL = 1e-4
"""float32 checkpoints: max abs difference allowed."""
DEFAULT_MULTIPLE = 3.0
"""Reduced-precision checkpoints: allowed multiple of HF's own rounding error. Two implementations that round
independently differ by up to about twice the rounding error of either; 3 leaves room for the max over many
elements, while a wrong tensor moves outputs by orders of magnitude more."""


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
    """Seed of the random token ids and images (identical on every rank)."""


@dataclass
class CompareResult:
    """What compare found: Megatron vs HF at the checkpoint dtype, and (reduced precision only) HF's own rounding
    error on the same inputs."""

    dtype: str
    diff: ParityReport
    rounding: Optional[ParityReport] = None
    """|HF at `dtype` - HF float32| per output; None for float32 checkpoints."""

    def outputs(self) -> list:
        keys = sorted(self.diff.hidden_max_abs_diff, key=lambda x: (isinstance(x, str), x))
        return [("logits", self.diff.logits_max_abs_diff, _get(self.rounding, "logits"))] + [
            (f"layer {k} hidden", self.diff.hidden_max_abs_diff[k], _get(self.rounding, k)) for k in keys]

    def judge(self, tol: float = DEFAULT_TOL, multiple: float = DEFAULT_MULTIPLE) -> tuple:
        """(passed, printable lines, verdict line)."""
        lines, worst = [], 0.0
        for name, d, r in self.outputs():
            if d != d:
                continue
            if self.rounding is None:
                lines.append(f"{name} max abs diff: {d:.3e}")
                worst = max(worst, d)
            else:
                ratio = d / r if r > 0 else (0.0 if d == 0 else float("inf"))
                lines.append(f"{name} (worst position's relative L2): megatron vs hf({self.dtype}) {d:.3e}; "
                             f"hf({self.dtype}) vs hf(float32) {r:.3e}; ratio {ratio:.2f}")
                worst = max(worst, ratio)
        if self.rounding is None:
            ok = worst <= tol
            verdict = f"{'PASS' if ok else 'FAIL'}: worst max abs diff {worst:.3e} (tol {tol:.1e}, float32)"
        else:
            ok = worst <= multiple
            verdict = (f"{'PASS' if ok else 'FAIL'}: worst ratio {worst:.2f} (limit {multiple:g}x HF's own "
                       f"{self.dtype}-vs-float32 difference on the same inputs)")
        return ok, lines, verdict


def _get(report: Optional[ParityReport], key):
    if report is None:
        return None
    return report.logits_max_abs_diff if key == "logits" else report.hidden_max_abs_diff.get(key, float("nan"))


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


def _hf_outputs(family, hf_dir: str, dtype: str, inputs) -> tuple:
    """HF logits and hidden states at `dtype` (the model is freed before returning)."""
    import torch
    import transformers

    from spark_megatron.models.parity import hf_forward

    model = getattr(transformers, family.hf_model_class).from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    try:
        return hf_forward(model.eval(), inputs)
    finally:
        del model


def _compare_rank(rank: int, world: int, plan: ComparePlan):
    from spark_megatron.models.parity import max_relative_l2, megatron_forward, merge_reports, output_diffs
    from spark_megatron.parallel.groups import init_distributed

    launcher.quiet_known_warnings()
    init_distributed(plan.tp, plan.pp)
    try:
        meta = read_meta(plan.ckpt_dir)
        family = family_for_config(meta.hf_config)
        shape = family.shape_from_hf_dict(meta.hf_config)
        stage = build_stage_for_loading(family, shape, meta.dtype, meta.vocab_divisible_by)
        load_megatron_checkpoint(stage, plan.ckpt_dir)  # raises on every rank alike
    except launcher.USER_ERRORS as e:
        return launcher.error_value(e)
    tokens = random_tokens(shape.vocab_size, plan.batch, plan.seq_len, plan.seed)
    inputs = vl_inputs(plan.hf_dir, shape, tokens, plan.seed) if hasattr(shape, "image_token_id") else tokens
    m_logits, m_hidden = megatron_forward(stage, inputs, shape.vocab_size)
    del stage
    h_logits, h_hidden = _hf_outputs(family, plan.hf_dir, meta.dtype, inputs)
    if meta.dtype == "float32":
        return CompareResult(meta.dtype, merge_reports(output_diffs(m_logits, m_hidden, h_logits, h_hidden)))
    diff = merge_reports(output_diffs(m_logits, m_hidden, h_logits, h_hidden, max_relative_l2))
    r_logits, r_hidden = _hf_outputs(family, plan.hf_dir, "float32", inputs)  # HF's own rounding: the yardstick
    return CompareResult(meta.dtype, diff, output_diffs(h_logits, h_hidden, r_logits, r_hidden, max_relative_l2))


def random_image_sizes(v, factor: int) -> list:
    """Two (height, width) sizes, multiples of the processor's `factor`, each spanning several attention windows
    with at least one side not a multiple of the window."""
    win = max(1, v.window_size // (v.patch_size * v.spatial_merge_size))  # window side in merged tokens
    return [((2 * win + 1) * factor, (3 * win + 1) * factor), ((win + 1) * factor, 2 * win * factor)]


def vl_inputs(hf_dir: str, shape, text: "torch.Tensor", seed: int):  # noqa: F821
    """ParityInputs for a VL model: row i = <|vision_start|> image_i <|vision_end|> + text[i] (the config's
    vision ids in `text` are replaced, so every placeholder belongs to an image). Images: seeded random RGB, the
    two `random_image_sizes` alternating over the rows (the processor may scale them into its pixel bounds)."""
    import numpy as np
    import torch
    from PIL import Image

    from spark_megatron.models.parity import ParityInputs
    from spark_megatron.models.qwen2_5_vl import mrope_position_ids
    from spark_megatron.vision import ImagePreprocessor

    cfg = read_hf_config(hf_dir)
    pre = ImagePreprocessor(hf_dir)
    rng = np.random.default_rng(seed)
    sizes = random_image_sizes(shape.vision, pre.factor)
    images = [pre.prepare(Image.fromarray(rng.integers(0, 255, sizes[i % 2] + (3,), dtype=np.uint8)),
                          source=f"random image {i}") for i in range(text.shape[0])]
    start, end = cfg.get("vision_start_token_id", 0), cfg.get("vision_end_token_id", 0)
    special = torch.tensor([i for i in (shape.image_token_id, shape.video_token_id, start, end,
                                        cfg.get("vision_token_id", -1)) if i is not None and i >= 0])
    text = torch.where(torch.isin(text, special), torch.zeros_like(text), text)
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
                        seed: int = 0, timeout_s: float = 3600) -> CompareResult:
    """Load the Megatron checkpoint at TP x PP and diff it against HF transformers."""
    plan = plan_compare(hf_dir, ckpt_dir, tp, pp, seq_len, batch, seed)
    results = launcher.run_layout(_compare_rank, tp * pp, plan, timeout_s=timeout_s)
    return next(r for r in results if r is not None)
