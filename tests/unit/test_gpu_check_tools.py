"""The GPU check's tools on their own: FLOP/parameter accounting against HF models, device peaks, the JSON schema
validator, the megatron-core API checker and the wheel-list classifier, each on inputs built to fail."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def _load(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


actor_step = _load("bench/actor_step.py")
gpu_report = _load("scripts/gpu_report.py")
check_mcore_api = _load("scripts/check_mcore_api.py")
gpu_imports = _load("scripts/gpu_imports.py")


@pytest.mark.parametrize("name", ["qwen2.5-1.5b", "qwen2.5-7b", "tiny"])
def test_parameter_counts_match_the_hf_model(name):
    """total and matmul parameters (the FLOP count's basis) against the HF model built on the meta device."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = actor_step.MODELS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**actor_step.hf_config_dict(cfg)))
    assert actor_step.total_params(cfg) == sum(p.numel() for p in model.parameters())
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert actor_step.matmul_params(cfg) == sum(linear.values())
    s = 2048
    assert actor_step.train_flops_per_token(cfg, s) == 6 * sum(linear.values()) + 12 * cfg["num_hidden_layers"] * s \
        * cfg["hidden_size"]  # Qwen2.5: heads x head_dim == hidden


def test_device_peaks_take_the_most_specific_name():
    assert actor_step.device_peak_tflops("NVIDIA H200")[0] == 989.4
    assert actor_step.device_peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert actor_step.device_peak_tflops("NVIDIA H100 PCIe")[0] == 756.5
    assert actor_step.device_peak_tflops("NVIDIA H200 NVL")[0] == 835.5
    assert actor_step.device_peak_tflops("Tesla T4")[0] is None


def test_schema_validator_names_every_violation():
    v, S = gpu_report.validate, gpu_report.SCHEMA
    errs = v({"schema": "x", "created": 1, "dry_run": 1, "steps": [{"name": "a"}]}, S)
    assert "$.created: expected str, got int" in errs
    assert "$.dry_run: expected bool, got int" in errs  # ints are not bools
    assert "$.steps[0].rc: missing" in errs and "$.ok: missing" in errs
    assert v(True, int) and not v(3, gpu_report.NUM) and not v(None, gpu_report.OPT_NUM)
    assert v({"error": "boom"}, gpu_report.ACTOR_STEP["megatron"])  # an error entry needs its traceback too
    assert not v({"error": "boom", "traceback": "t"}, gpu_report.ACTOR_STEP["megatron"])


def _fake_megatron(root: Path) -> None:
    core = root / "megatron" / "core"
    (core / "transformer").mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "transformer" / "__init__.py").write_text("from .transformer_config import TransformerConfig\n")
    (core / "transformer" / "transformer_config.py").write_text(
        "from dataclasses import dataclass\n\n@dataclass\nclass ModelParallelConfig:\n"
        "    tensor_model_parallel_size: int = 1\n\n@dataclass\nclass TransformerConfig(ModelParallelConfig):\n"
        "    num_layers: int = 0\n\n\ndef build(config, *, spec=None, **kwargs):\n    return make(config, **kwargs)\n"
        "\n\ndef make(config, depth=1):\n    return config\n")


def test_api_checker_finds_missing_names_and_keywords(tmp_path):
    _fake_megatron(tmp_path / "mc")
    ours = tmp_path / "repo" / "spark_megatron"
    ours.mkdir(parents=True)
    (ours / "use.py").write_text(
        "from megatron.core.transformer import TransformerConfig, Gone\n"
        "from megatron.core.transformer import transformer_config as tc\n\n\n"
        "def f():\n    kw = dict(num_layers=2, tensor_model_parallel_size=1)\n    kw.update(add_qkv_bias=True)\n"
        "    tc.build(TransformerConfig(**kw), spec=1, depth=2, width=3)\n    return tc.vanished\n")
    _, findings = check_mcore_api.run(str(tmp_path / "mc"), root=tmp_path / "repo", members=False)
    bad = {(f.what.split("(")[0], f.detail) for f in findings if not f.ok}
    assert bad == {("megatron.core.transformer.Gone", "not defined in that module"),
                   ("megatron.core.transformer.transformer_config.vanished", "not defined in that module"),
                   ("megatron.core.transformer.TransformerConfig", "unknown keyword(s): add_qkv_bias"),
                   # **kwargs forwarded to make(): checked against make's parameters
                   ("megatron.core.transformer.transformer_config.build", "unknown keyword(s): width")}


def test_api_checker_passes_on_the_installed_megatron_core():
    version, findings = check_mcore_api.run(None)
    assert version.startswith("0.") and len(findings) > 200
    assert [f for f in findings if not f.ok] == []


def test_import_classifier_requires_a_provider_for_every_unguarded_import():
    site = gpu_imports.ImportSite
    sites = {"megatron": site("megatron", "a.py:1", False), "torch": site("torch", "a.py:2", False),
             "vllm": site("vllm", "b.py:3", False), "flash_attn": site("flash_attn", "c.py:4", True),
             "definitely_not_installed_xyz": site("definitely_not_installed_xyz", "d.py:5", False)}
    got = {f.module: f.provided_by for f in gpu_imports.classify(sites, device={"torch"}, wheels={"megatron-core"})}
    assert got == {"megatron": "wheel", "torch": "device", "vllm": "optional", "flash_attn": "optional",
                   "definitely_not_installed_xyz": "no-distribution"}
    without = {f.module: f.provided_by for f in gpu_imports.classify(sites, device={"torch"}, wheels=set())}
    assert without["megatron"] == "missing"


def test_wheel_list_is_pinned_and_provides_megatron_core():
    lines = [ln.split("#")[0].strip() for ln in (REPO / "scripts/gpu_wheels.txt").read_text().splitlines()]
    pins = [ln for ln in lines if ln]
    assert pins and all("==" in p for p in pins)
    assert any(p.startswith("megatron-core==0.19.") for p in pins)
    assert "torch" in gpu_imports.read_list(REPO / "scripts/gpu_device_packages.txt")
