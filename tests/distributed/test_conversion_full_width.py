"""Conversion at published widths: Qwen2.5-1.5B-Instruct (tied) and Qwen2.5-VL-3B-Instruct (tied) with random bf16
weights, their published configs (configs/models/) at reduced depth, sharded like hub checkpoints; the VL model
in both tensor-name schemes (hub `visual.*`/`model.*`, transformers-4.52 `model.visual.*`/`model.language_model.*`).

Round trips are bit-exact with names and config.json preserved, each rank's memory stays within its share, and
compare passes on the bf16 checkpoint against HF's own bf16 rounding and fails when one tensor is wrong. All
conversions of the module run in one spawned pair of ranks (spawn and imports are most of the cost).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import copy_checkpoint, tiny_hf_checkpoint

REPO = Path(__file__).resolve().parents[2]
MODELS = {"q15b": ("qwen2_5_1_5b_instruct", "hub"), "vl3b_hub": ("qwen2_5_vl_3b_instruct", "hub"),
          "vl3b_tf": ("qwen2_5_vl_3b_instruct", "transformers")}


def _tensors_equal(a: Path, b: Path, rename=None) -> int:
    from spark_megatron.models.weights import HFCheckpointReader

    ra, rb = HFCheckpointReader(a), HFCheckpointReader(b)
    keys = {rename(k) if rename else k for k in ra.keys()}
    assert keys == set(rb.keys()), sorted(keys ^ set(rb.keys()))[:4]
    for k in ra.keys():
        x, y = ra.get(k), rb.get(rename(k) if rename else k)
        assert x.dtype == y.dtype and torch.equal(x.view(torch.int16), y.view(torch.int16)), k
        ra.release(k)
        rb.release(rename(k) if rename else k)
    return len(keys)


def _convert_rank(rank: int, world: int, jobs: list):
    from spark_megatron.checkpoint.hf_export import _export_rank
    from spark_megatron.checkpoint.hf_import import _import_rank

    out = []
    for imp, exports in jobs:
        out.append((_import_rank(rank, world, imp), [_export_rank(rank, world, e) for e in exports]))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Write the three source checkpoints, then import each at TP2 and export it with 2 workers (the hub-named
    VL checkpoint's Megatron copy also to transformers names, the transformers-named one's also to hub names)."""
    from spark_megatron.checkpoint.hf_export import ExportPlan
    from spark_megatron.checkpoint.hf_import import plan_hf_to_megatron
    from spark_megatron.models.random_checkpoint import reduced_config, write_random_checkpoint
    from spark_megatron.parallel.spawn import run_on_ranks

    root = tmp_path_factory.mktemp("full_width")
    jobs = []
    for name, (config, scheme) in MODELS.items():
        cfg = reduced_config(REPO / "configs" / "models" / f"{config}.json", layers=2, vision_depth=2)
        src = write_random_checkpoint(cfg, root / name, scheme, max_shard_bytes=300_000_000)
        exports = [ExportPlan(str(root / f"{name}_mg"), str(root / f"{name}_back"), 2, "bfloat16", 250_000_000,
                              scheme, False, False)]
        if name.startswith("vl3b"):
            other = "transformers" if scheme == "hub" else "hub"
            exports.append(ExportPlan(str(root / f"{name}_mg"), str(root / f"{name}_as_{other}"), 2, "bfloat16",
                                      10**10, other, False, False))
        jobs.append((plan_hf_to_megatron(src, root / f"{name}_mg", tp=2, progress=False), exports))
    per_rank = run_on_ranks(_convert_rank, 2, jobs, timeout_s=900)
    return root, {name: [r[i] for r in per_rank] for i, name in enumerate(MODELS)}


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_full_width_round_trips_are_bit_exact_in_both_vl_namings_with_bounded_memory(converted):
    from spark_megatron.models.qwen2_5_vl_mapping import NAMING

    root, stats = converted
    for name, (_, scheme) in MODELS.items():
        src, back = root / name, root / f"{name}_back"
        assert _tensors_equal(src, back) > 20
        assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
        assert json.loads((root / f"{name}_mg" / "spark_meta.json").read_text())["hf_naming"] == \
            (scheme if name.startswith("vl3b") else None)
        index = json.loads((back / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2  # several files, written by both workers
        model_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        largest = max(t.numel() * t.element_size() for t in _tensors(src))
        for imp, exports in stats[name]:  # every rank: peak RSS above its post-import RSS within the bound
            for st, share in [(imp, model_bytes / 2)] + [(e, model_bytes / 2) for e in exports]:
                assert st["peak_rss_bytes"] - st["rss_after_init_bytes"] <= 1.2 * share + largest, (name, st)
    vlh, vlt = root / "vl3b_hub", root / "vl3b_tf"
    assert next(iter(json.loads((vlt / "model.safetensors.index.json").read_text())["weight_map"])).startswith(
        ("model.visual.", "model.language_model.", "lm_head."))
    _tensors_equal(vlh, root / "vl3b_hub_as_transformers", rename=lambda n: NAMING.to_scheme(n, "transformers"))
    _tensors_equal(vlt, root / "vl3b_tf_as_hub", rename=lambda n: NAMING.to_canonical(n, "transformers"))
    _tensors_equal(vlh, vlt, rename=lambda n: NAMING.to_scheme(n, "transformers"))  # the same model


def _tensors(hf_dir: Path):
    from spark_megatron.models.weights import HFCheckpointReader

    r = HFCheckpointReader(hf_dir)
    return [r.get(k) for k in r.keys()]


def _swap_kv_heads(hf_dir: Path, name: str, head_dim: int) -> None:
    """The classic GQA conversion bug, in place: the first two KV heads of a k_proj swapped."""
    from spark_megatron.models.weights import HFCheckpointReader

    info = HFCheckpointReader(hf_dir).info(name)
    row = info.nbytes // info.shape[0]
    path = next(p for p in hf_dir.glob("*.safetensors") if name in json.loads(_header(p)))
    with open(path, "r+b") as f:
        f.seek(info.offset)
        a, b = f.read(head_dim * row), f.read(head_dim * row)
        f.seek(info.offset)
        f.write(b + a)


def _header(path: Path) -> str:
    raw = path.read_bytes()[:8]
    return path.read_bytes()[8:8 + int.from_bytes(raw, "little")].decode()


def _compare_rank(rank: int, world: int, plans: list):
    from spark_megatron.checkpoint.comparison import _compare_rank as compare

    return [compare(rank, world, p) for p in plans]


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_compare_passes_at_defaults_on_bf16_and_fails_when_one_tensor_is_perturbed(converted):
    """Full-width VL-3B in bf16: the Megatron copy passes against HF's own bf16-vs-fp32 rounding, measured on the
    same inputs (random images spanning several 4x4 vision windows, sides not multiples of the window); the same
    checkpoint fails against an HF copy whose layer-0 k_proj has two KV heads swapped."""
    from spark_megatron.checkpoint.comparison import DEFAULT_MULTIPLE, plan_compare
    from spark_megatron.parallel.spawn import run_on_ranks

    root, _ = converted
    src, mg = root / "vl3b_hub", root / "vl3b_hub_mg"
    wrong = root / "vl3b_wrong"
    shutil.copytree(src, wrong)
    _swap_kv_heads(wrong, "model.layers.0.self_attn.k_proj.weight", 128)
    plans = [plan_compare(src, mg, seq_len=16), plan_compare(wrong, mg, seq_len=16)]
    good, bad = run_on_ranks(_compare_rank, 1, plans, timeout_s=900)[0]
    ok, lines, verdict = good.judge()
    assert good.dtype == "bfloat16" and good.rounding is not None
    assert ok and verdict.startswith("PASS"), "\n".join(lines + [verdict])
    assert all("megatron vs hf(bfloat16)" in line and "hf(bfloat16) vs hf(float32)" in line for line in lines)
    assert all(0 < r < 0.05 for _, _, r in good.outputs())  # bf16 rounding, relative: a few 2^-8
    assert len(lines) == 3  # logits, layer 0, final norm
    ok, lines, verdict = bad.judge()
    assert not ok and verdict.startswith("FAIL"), "\n".join(lines + [verdict])
    worst = max(d / r for _, d, r in bad.outputs())
    assert worst > 3 * DEFAULT_MULTIPLE, worst  # far outside, not a borderline call


# ------------------------------------------------------------------------------------------------ bad input

def _rewrite(hf_dir: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    save_file(fn(load_file(str(hf_dir / "model.safetensors"))), str(hf_dir / "model.safetensors"),
              metadata={"format": "pt"})


@pytest.mark.unit
def test_tied_checkpoint_with_a_different_lm_head_is_refused_and_an_equal_one_accepted(tmp_path):
    from spark_megatron.checkpoint.hf_import import plan_hf_to_megatron
    from spark_megatron.models.weights import CheckpointError

    equal = copy_checkpoint(tiny_hf_checkpoint("tied"), tmp_path / "equal")
    _rewrite(equal, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    assert plan_hf_to_megatron(equal, tmp_path / "out_equal").tp == 1
    different = copy_checkpoint(tiny_hf_checkpoint("tied"), tmp_path / "different")
    _rewrite(different, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] * 1.5})
    with pytest.raises(CheckpointError, match="tie_word_embeddings but lm_head.weight differs from "
                                              "model.embed_tokens.weight") as e:
        plan_hf_to_megatron(different, tmp_path / "out_different")
    assert "\n" not in str(e.value) and not (tmp_path / "out_different").exists()


@pytest.mark.unit
def test_vl_checkpoint_mixing_both_namings_is_refused_in_one_line(tmp_path):
    from spark_megatron.checkpoint.hf_import import plan_hf_to_megatron
    from spark_megatron.models.mapping import MappingError
    from spark_megatron.models.qwen2_5_vl_mapping import NAMING

    mixed = copy_checkpoint(tiny_hf_checkpoint("vl"), tmp_path / "mixed")
    _rewrite(mixed, lambda t: {(NAMING.to_scheme(k, "transformers") if k.startswith("visual.") else k): v
                               for k, v in t.items()})
    with pytest.raises(MappingError, match="mixes hub tensor names .* with transformers names"):
        plan_hf_to_megatron(mixed, tmp_path / "out")
