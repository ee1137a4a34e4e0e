"""The config loader: unknown keys are rejected with a suggestion, values are coerced to the declared field
types, and `key=value` overrides apply on top of a YAML recipe."""
from __future__ import annotations

import dataclasses

import pytest

from spark_megatron.config import ConfigError, RunConfig, load_config, save_config, to_dict

pytestmark = pytest.mark.unit


def _yaml(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_equal_the_dataclass_defaults():
    assert to_dict(load_config()) == dataclasses.asdict(RunConfig())


@pytest.mark.parametrize("override, key, suggestion", [
    ("optim.lrr=1e-6", "optim.lrr", "lr"),
    ("rollout.temprature=0.7", "rollout.temprature", "temperature"),
    ("algorithm.recycle.enabeld=false", "algorithm.recycle.enabeld", "enabled"),
    ("optimm.lr=1", "optimm.lr", "optim"),
])
def test_unknown_override_key_names_the_key_and_suggests(override, key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"unknown config key '{key}'" in str(e.value)
    assert f"did you mean '{suggestion}'" in str(e.value)


def test_unknown_yaml_key_names_the_file_and_suggests(tmp_path):
    path = _yaml(tmp_path, "optim:\n  lr: 1.0e-4\n  micro_batch_sise: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and "'optim.micro_batch_sise'" in msg and "did you mean 'micro_batch_size'" in msg


def test_unknown_key_without_a_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.zzzzzz=1"])
    assert "did you mean" not in str(e.value)


def test_yaml_values_are_coerced_to_field_types(tmp_path):
    # PyYAML reads `1e-4` (no dot) as a string: the loader must still give a float
    path = _yaml(tmp_path, "optim:\n  lr: 1e-4\n  micro_batch_size: '4'\nrollout:\n  colocate: 'false'\n"
                           "model:\n  fp8: null\n")
    cfg = load_config(path)
    assert cfg.optim.lr == pytest.approx(1e-4) and type(cfg.optim.lr) is float
    assert cfg.optim.micro_batch_size == 4 and type(cfg.optim.micro_batch_size) is int
    assert cfg.rollout.colocate is False
    assert cfg.model.fp8 is None


@pytest.mark.parametrize("override, getter, expected", [
    ("optim.lr=3e-7", lambda c: c.optim.lr, 3e-7),
    ("rollout.n=16", lambda c: c.rollout.n, 16),
    ("rollout.n=16.0", lambda c: c.rollout.n, 16),
    ("rollout.colocate=false", lambda c: c.rollout.colocate, False),
    ("model.fp8=none", lambda c: c.model.fp8, None),
    ("model.fp8=delayed", lambda c: c.model.fp8, "delayed"),
    ("rollout.kv_cache_memory_bytes=67108864", lambda c: c.rollout.kv_cache_memory_bytes, 64 << 20),
    ("data.train_files=[a.jsonl, b.jsonl]", lambda c: c.data.train_files, ["a.jsonl", "b.jsonl"]),
    ("launch.env={WANDB_MODE: offline}", lambda c: c.launch.env, {"WANDB_MODE": "offline"}),
    ("algorithm.recycle.max_judgment_per_step=8", lambda c: c.algorithm.recycle.max_judgment_per_step, 8),
])
def test_override_values_are_coerced(override, getter, expected):
    value = getter(load_config(None, [override]))
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=fast", "expects float"),
    ("rollout.n=2.5", "expects an integer"),
    ("rollout.n=true", "expects int"),
    ("rollout.colocate=maybe", "expects true/false"),
    ("data.train_files=3", "expects a list"),
    ("optim=3", "is a section"),
    ("optim.lr.x=1", "is a value, not a section"),
    ("no_equals_sign", "not of the form key=value"),
    ("data.train_files=[synthetic:shapes?n=16]", r"data.train_files=\[synthetic:shapes\?n=16\]': value is not valid "
                                                 r"YAML at column 18"),
])
def test_bad_override_values_are_rejected(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_overrides_apply_on_top_of_the_recipe(tmp_path):
    path = _yaml(tmp_path, "optim:\n  lr: 2.0e-4\n  train_batch_size: 32\nrollout:\n  n: 4\n")
    cfg = load_config(path, ["rollout.n=16", "optim.lr=1e-5"])
    assert cfg.rollout.n == 16 and cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.optim.train_batch_size == 32  # untouched recipe value survives
    assert cfg.optim.micro_batch_size == RunConfig().optim.micro_batch_size  # default where neither says


def test_later_override_wins():
    assert load_config(None, ["rollout.n=2", "rollout.n=3"]).rollout.n == 3


@pytest.mark.parametrize("text, needle", [
    ("- 1\n- 2\n", "top level must be a mapping"),
    ("optim: [1\n", "invalid YAML"),
    ("optim: 3\n", "is a section"),
])
def test_malformed_recipes_are_rejected_with_the_path(tmp_path, text, needle):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value) and path in str(e.value)


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="config file not found: /no/such.yaml"):
        load_config("/no/such.yaml")


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-6", "rollout.n=4", "data.train_files=[x.jsonl]", "model.fp8=tensorwise"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert to_dict(load_config(str(tmp_path / "saved.yaml"))) == to_dict(cfg)
