"""The value rules of the config tree (config.FIELD_RULES): every field has one, the spelled-out choices equal
the registries and constants the code really dispatches on, every shipped recipe passes, and each kind of bad
value is named with its key."""
from __future__ import annotations

from pathlib import Path

import pytest

from spark_megatron.config import FIELD_RULES, ConfigError, check_values, leaf_keys, load_config, value_problems

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_every_field_has_exactly_one_rule():
    keys = leaf_keys()
    assert sorted(set(keys) - set(FIELD_RULES)) == [], "config fields without a value rule"
    assert sorted(set(FIELD_RULES) - set(keys)) == [], "rules for fields that do not exist"


def _choices(key):
    return set(FIELD_RULES[key].describe.removeprefix("null or ").removeprefix("one of ").split(", "))


def test_choices_equal_what_the_code_dispatches_on():
    from spark_megatron.algo.advantages import ADVANTAGE_ESTIMATORS
    from spark_megatron.algo.aggregation import LOSS_AGGREGATIONS
    from spark_megatron.algo.kl import KL_ESTIMATORS
    from spark_megatron.launch import validation as v
    from spark_megatron.recycle.builder import JUDGE_INPUTS, LABEL_STYLES
    from spark_megatron.recycle.scheduler import SCHEDULES

    assert _choices("algorithm.kl_estimator") == set(KL_ESTIMATORS.names())
    assert _choices("algorithm.loss_agg") == set(LOSS_AGGREGATIONS.names())
    assert _choices("algorithm.adv_estimator") == set(ADVANTAGE_ESTIMATORS.names())
    assert _choices("algorithm.recycle.judge_input") == set(JUDGE_INPUTS)
    assert _choices("algorithm.recycle.label_style") == set(LABEL_STYLES)
    assert _choices("algorithm.recycle.schedule") == set(SCHEDULES)
    assert _choices("model.fp8") == set(v.FP8_RECIPES)
    assert _choices("model.params_dtype") == set(v.PARAM_DTYPES)
    assert _choices("launch.gpu_arch") == set(v.GPU_ARCHS)
    assert _choices("launch.executor") == set(v.EXECUTORS)
    assert _choices("launch.tunnel") == set(v.TUNNELS)


def test_image_aspect_limit_matches_the_vision_preprocessor():
    from spark_megatron.data.records import MAX_ASPECT_RATIO
    from spark_megatron.vision.images import MAX_ASPECT_RATIO as VISION_LIMIT

    assert MAX_ASPECT_RATIO == VISION_LIMIT


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_recipes_pass(recipe):
    check_values(load_config(str(ROOT / "configs" / recipe)))


@pytest.mark.parametrize("override, needle", [
    ("optim.micro_batch_size=-4", "optim.micro_batch_size=-4 (must be an integer >= 1)"),
    ("total_steps=-5", "total_steps=-5 (must be an integer >= 0)"),
    ("rollout.n=0", "rollout.n=0 (must be an integer >= 1)"),
    ("algorithm.kl_estimator=k9", "algorithm.kl_estimator='k9' (must be one of k1, k2, k3, low_var_kl)"),
    ("rollout.top_p=0", "rollout.top_p=0.0 (must be in (0, 1])"),
    ("optim.lr=.nan", "optim.lr=nan (must be a finite number > 0)"),
    ("optim.adam_beta2=1", "optim.adam_beta2=1.0 (must be in [0, 1))"),
    ("model.fp8=e4m3", "model.fp8='e4m3' (must be null or one of delayed, tensorwise, blockwise)"),
    ("data.train_files=[]", "data.train_files=[] (must be a non-empty list of data specs)"),
    ("launch.time_limit=4h", "launch.time_limit='4h' (must be a Slurm time limit"),
    ("output_dir=''", "output_dir='' (must be a non-empty string)"),
    ("data.image_min_pixels=9999999999", "data.image_min_pixels=9999999999 exceeds data.image_max_pixels"),
])
def test_bad_values_are_named_on_one_line(override, needle):
    cfg = load_config(str(ROOT / "configs" / "tiny_cpu.yaml"), [override])
    with pytest.raises(ConfigError) as err:
        check_values(cfg)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_all_problems_are_listed_at_once():
    bad = ["rollout.n=0", "optim.lr=-1", "checkpoint.keep_last=-1"]
    cfg = load_config(str(ROOT / "configs" / "tiny_cpu.yaml"), bad)
    assert [p.split("=")[0] for p in value_problems(cfg)] == ["rollout.n", "optim.lr", "checkpoint.keep_last"]
