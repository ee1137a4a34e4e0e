"""Planner arithmetic: architecture counts against HF transformers, Megatron's buffer layout rules on a
hand-worked example, and the shipped recipes' plans against their device memory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from spark_megatron.config import load_config
from spark_megatron.launch.architecture import ModelArchitecture, rank_params, total_params
from spark_megatron.launch.grad_buffers import buffer_layout, owned_elements
from spark_megatron.launch.planner import GIB, PlanOptions, check_fits, layer_activation_bytes, plan
from spark_megatron.launch.report import format_report
from spark_megatron.launch.validation import RecipeError, resolve_architecture

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
MODELS = ["qwen2_5_1_5b_instruct", "qwen2_5_7b_instruct", "qwen2_5_vl_3b_instruct", "qwen2_5_vl_7b_instruct",
          "qwen2_5_vl_32b_instruct"]
RECIPES = ["qwen2_5_7b_text", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_32b_fp8_delayed",
           "qwen2_5_vl_32b_fp8_tensorwise", "qwen2_5_vl_32b_fp8_blockwise"]


@pytest.mark.parametrize("name", MODELS)
def test_total_params_equal_hf_model(name):
    """HF transformers builds the model on the meta device; its parameter count is the oracle."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    path = ROOT / "configs" / "models" / f"{name}.json"
    cfg = json.loads(path.read_text())
    with torch.device("meta"):
        if cfg["architectures"][0] == "Qwen2ForCausalLM":
            model = Qwen2ForCausalLM(Qwen2Config(**cfg))
        else:
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg))
    arch = ModelArchitecture.from_path(path)
    assert total_params(arch) == sum(p.numel() for p in model.parameters())
    if arch.vision is not None:  # Megatron's tower = HF's plus the zero padding of the MLP width (7B: 3420 -> 3456)
        vision = [e for e in rank_params(arch, 1, 1, 0) if e.name.startswith("vision_model.")]
        assert sum(e.numel - e.padding for e in vision) == sum(p.numel() for p in model.model.visual.parameters())
        v = arch.vision
        width = {3420: 3456, 3456: 3456}[v.intermediate_size]  # the published widths (3B/7B, 32B/72B)
        assert sum(e.padding for e in vision) == v.depth * (3 * v.hidden_size + 2) * (width - v.intermediate_size)


@pytest.mark.parametrize("tp,pp", [(8, 2), (4, 4)])
def test_pipeline_stages_partition_the_model(tp, pp):
    """Untied 32B at the recipe's TP8 x PP2 (and TP4 x PP4): the stages' unsharded tensors add up to the padded
    model, once each; the 32B's vision MLP width 3456 splits without padding at both TPs (432 / 864 per shard)."""
    arch = ModelArchitecture.from_path(ROOT / "configs" / "models" / "qwen2_5_vl_32b_instruct.json")
    names, full = [], 0
    for p in range(pp):
        entries = rank_params(arch, tp, pp, p)
        full += sum(e.full_numel for e in entries)
        assert all(e.numel * tp == e.full_numel or e.numel == e.full_numel for e in entries)
        names += [e.name for e in entries]
        fc2 = [e for e in entries if e.name.endswith("vision_model.decoder.layers.0.mlp.linear_fc2.weight")]
        assert not fc2 or fc2[0].numel == arch.vision.hidden_size * 3456 // tp
    assert full == total_params(arch, include_padding=True)
    assert sum("output_layer" in n for n in names) == 1 and sum("word_embeddings" in n for n in names) == 1


def test_buffer_layout_follows_megatron_padding_rules():
    """Worked by hand from megatron's _ParamAndGradBuffer: reverse order, params start at multiples of 64,
    buckets end at multiples of lcm(DP, 128), a shared embedding closes the open bucket and gets its own."""
    lay = buffer_layout([100, 30, 70], [True, False, False], dp=2, distributed_optimizer=True, bucket_size=None)
    assert lay.param_ranges == [(256, 356), (128, 158), (0, 70)]
    assert lay.buckets == [(0, 256), (256, 384)] and lay.numel == 384 and lay.numel_unpadded == 292
    assert owned_elements(lay, 2, 0) == [64, 0, 70]  # slices [0, 128) and [256, 320)
    assert owned_elements(lay, 2, 1) == [36, 30, 0]  # slices [128, 256) and [320, 384)
    plain = buffer_layout([100, 30, 70], [True, False, False], dp=2, distributed_optimizer=False, bucket_size=None)
    assert plain.param_ranges == [(100, 200), (70, 100), (0, 70)] and plain.numel == 200
    # a bucket closes once it holds >= bucket_size elements: 70 alone, then 30 + (64-aligned) 100
    split = buffer_layout([100, 30, 70], [False] * 3, dp=1, distributed_optimizer=True, bucket_size=60)
    assert split.buckets == [(0, 128), (128, 384)] and split.param_ranges == [(192, 292), (128, 158), (0, 70)]


def test_activation_terms():
    base = dict(tokens=4096, seq=4096, batch=1, h=5120, heads=40, kv_heads=8, head_dim=128, ffn=27648, tp=8, e=2)
    full = layer_activation_bytes(**base, sp=False, fp8=False, flash=True)
    # 4h replicated + ((a + 2g) d + a d + 3f) / t sharded at 2 bytes, plus the fp32 log-sum-exp
    assert full == 4096 * (4 * 5120 * 2 + (56 * 128 * 2 + 40 * 128 * 2 + 3 * 27648 * 2) // 8 + 4 * 40 // 8)
    assert layer_activation_bytes(**base, sp=True, fp8=False, flash=True) < full
    assert layer_activation_bytes(**base, sp=False, fp8=True, flash=True) < full
    no_flash = layer_activation_bytes(**base, sp=False, fp8=False, flash=False)
    assert no_flash - full == (4 + 2) * 1 * (40 // 8) * 4096 ** 2


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipes_fit_80gib(recipe):
    cfg = load_config(str(ROOT / "configs" / f"{recipe}.yaml"), ["launch.account=acct"])
    report = plan(cfg, resolve_architecture(cfg))
    check_fits(report)
    assert report.peak_bytes <= 80 * GIB and report.rollout.sequences_at_max_len >= 1
    lay = report.layout
    assert lay.tp * lay.pp * lay.dp == cfg.launch.nodes * cfg.launch.gpus_per_node
    text = format_report(report)
    assert "fits" in text and f"TP {lay.tp} x PP {lay.pp} x DP {lay.dp}" in text
    # bf16 + distributed optimizer: params 2 B, fp32 main grads 4 B, master 4 B and Adam 8 B over DP
    for st in report.stages:
        assert st.grad_bytes == 2 * st.param_bytes
        assert st.master_param_bytes * 2 == st.adam_bytes
        assert abs(st.master_param_bytes * lay.dp - 4 * st.params) <= 4 * 128 * lay.dp * 64


def test_plan_fails_when_memory_is_too_small():
    cfg = load_config(str(ROOT / "configs" / "qwen2_5_vl_32b.yaml"), ["launch.account=acct"])
    report = plan(cfg, resolve_architecture(cfg), PlanOptions(gpu_memory_gib=40))
    assert not report.fits
    with pytest.raises(RecipeError, match=r"does not fit: the \w+ phase on pipeline stage 0 needs"):
        check_fits(report)
