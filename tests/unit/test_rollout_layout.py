"""The rollout layout (one function for the trainer and the planner): engines and their ranks, the prompt split and
gather, the push volume per rank, the engine watch's one-line failures, and the layout checks of `train`."""
from __future__ import annotations

import pytest

from spark_megatron.rollout.layout import (LayoutError, PushTensor, gather_in_order, push_volume, rollout_layout,
                                           split_prompts)

pytestmark = pytest.mark.unit


def test_engines_sit_on_consecutive_ranks():
    lay = rollout_layout(16, 8, 2, 8, on_gpu=True)
    assert (lay.engines, lay.ranks_per_engine, lay.actor_dp) == (2, 8, 1)
    assert lay.engine_ranks == (tuple(range(8)), tuple(range(8, 16)))
    assert [lay.engine_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1] and lay.engine_leader(1) == 8
    assert lay.label(1) == "rollout engine 1 (ranks 8-15)" and lay.sleeps and lay.blocks
    cpu = rollout_layout(2, 2, 1, 1, on_gpu=False)
    assert cpu.engines == 2 and cpu.label(1) == "rollout engine 1 (rank 1)" and not cpu.sleeps and not cpu.blocks
    assert "no sleep" in cpu.describe() and "2 engine(s) x TP 1" in cpu.describe()


@pytest.mark.parametrize("kwargs,reason", [
    (dict(world=4, actor_tp=2, actor_pp=1, rollout_tp=2, colocate=False), "rollout.colocate=false"),
    (dict(world=4, actor_tp=2, actor_pp=1, rollout_tp=3), "rollout.tensor_parallel_size 3 does not divide the 4"),
    (dict(world=6, actor_tp=4, actor_pp=1, rollout_tp=2), "not a multiple of actor TP 4"),
    (dict(world=16, actor_tp=8, actor_pp=2, rollout_tp=16, gpus_per_node=8), "spans nodes"),
    (dict(world=2, actor_tp=1, actor_pp=1, rollout_tp=2, engine="hf"), "rollout.engine=hf"),
    (dict(world=2, actor_tp=1, actor_pp=1, rollout_tp=1, sleep_level=3), "rollout.sleep_level"),
])
def test_unbuildable_layouts_fail_in_one_line(kwargs, reason):
    with pytest.raises(LayoutError, match=reason) as e:
        rollout_layout(**kwargs)
    assert "\n" not in str(e.value)


def test_prompt_split_is_balanced_contiguous_and_gathers_back_in_order():
    assert split_prompts(7, 2) == [(0, 4), (4, 7)]
    assert split_prompts(2, 3) == [(0, 1), (1, 2), (2, 2)]
    for n in range(0, 23):
        for engines in range(1, 6):
            shares = split_prompts(n, engines)
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            sizes = [b - a for a, b in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            prompts = [f"p{i}" for i in range(n)]
            per_engine = [[f"out:{p}" for p in prompts[a:b]] for a, b in shares]
            assert gather_in_order(per_engine, n) == [f"out:{p}" for p in prompts]
    with pytest.raises(RuntimeError, match="rollout engine 1 returned 1 results for its 3 prompts"):
        gather_in_order([["a", "b", "c"], ["d"]], 6)


def test_push_volume_counts_blocks_assembly_and_broadcasts():
    """TP2 x PP2 x DP1 (ranks 0,1 = stage 0; 2,3 = stage 1): a block tensor of stage 0 reaches ranks 2 and 3 as
    halves; an assembled one is half-received by its stage leader (rank 0) and broadcast whole to the others; a
    replicated block tensor (a norm) travels whole to the other stage."""
    lay = rollout_layout(4, 2, 2, 2, on_gpu=False)
    vol = push_volume(lay, [PushTensor(1000, 0, block=True), PushTensor(400, 0, block=False),
                            PushTensor(10, 1, block=True, split=False)])
    assert vol.model_bytes == 1410
    assert vol.received_bytes == (200 + 10, 400 + 10, 500 + 400, 500 + 400)
    assert vol.max_received_bytes == 900
    flat = rollout_layout(4, 2, 1, 2, on_gpu=False)  # PP 1, DP 2: blocks never move
    assert push_volume(flat, [PushTensor(1000, 0, block=True)]).received_bytes == (0, 0, 0, 0)


def test_planner_volume_for_the_32b_recipe_moves_blocks():
    from pathlib import Path

    from spark_megatron.config import load_config
    from spark_megatron.launch.planner import plan
    from spark_megatron.launch.report import format_report
    from spark_megatron.launch.validation import resolve_architecture

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(str(root / "configs" / "qwen2_5_vl_32b.yaml"), ["launch.account=acct"])
    report = plan(cfg, resolve_architecture(cfg))
    assert report.layout.rollout.engine_ranks == (tuple(range(8)), tuple(range(8, 16)))
    sync = report.sync
    # stage 1's decoder blocks (1/8 of half the decoder) plus the vision tower and both vocab tensors, whole
    assert 0.05 < sync.max_received_bytes / sync.model_bytes < 0.1
    text = format_report(report)
    assert "2 engine(s) x TP 8, colocated on ranks [0-7, 8-15]; sleep level 1" in text
    assert "each GPU receives at most 5.10 GiB (0.08x the model" in text
    broadcast = load_config(str(root / "configs" / "qwen2_5_vl_32b.yaml"),
                            ["launch.account=acct", "rollout.tensor_parallel_size=4"])
    full = plan(broadcast, resolve_architecture(broadcast)).sync  # TPs differ: every GPU gets the whole model
    assert full.block_bytes == 0 and full.max_received_bytes == full.model_bytes


def test_engine_watch_turns_engine_errors_into_one_line(tmp_path, monkeypatch):
    from spark_megatron.parallel.rank_status import STATUS_DIR_ENV, read_status
    from spark_megatron.rollout.watch import EngineFailure, EngineWatch

    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    watch = EngineWatch("rollout engine 1 (ranks 2-3)", 60, rank=3)
    seen = []
    with pytest.raises(EngineFailure) as e:
        with watch("generate"):
            seen.append(read_status(tmp_path, 3))
            raise ValueError("CPU attention does not support head size 16\nsecond line")
    assert str(e.value) == ("rollout engine 1 (ranks 2-3) failed during generate: ValueError: CPU attention does "
                            "not support head size 16")
    assert seen == ["busy: generate in rollout engine 1 (ranks 2-3)"] and read_status(tmp_path, 3) == ""
    with pytest.raises(KeyError):
        with watch("push", passthrough=(KeyError,)):
            raise KeyError("kept")


@pytest.mark.parametrize("argv,env,reason", [
    (["rollout.colocate=false"], None, "rollout.colocate=false (dedicated rollout GPUs, launch.rollout_gpus) is not "
                                       "built"),
    (["launch.rollout_gpus=2"], None, "launch.rollout_gpus 2: dedicated rollout GPUs are not built"),
    (["parallel.tensor_model_parallel_size=2", "rollout.tensor_parallel_size=4"], None,
     "rollout.tensor_parallel_size 4 does not divide the 2 ranks"),
    (["parallel.tensor_model_parallel_size=2"], {"WORLD_SIZE": "4", "RANK": "0"},
     "torchrun started 4 ranks but parallel.tensor_model_parallel_size 2 x pipeline_model_parallel_size 1 x "
     "data_parallel_size 1 = 2; set parallel.data_parallel_size=2"),
])
def test_train_refuses_layouts_it_cannot_build(tmp_path, argv, env, reason, monkeypatch, capsys):
    from spark_megatron.launch import train_entry

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    rc = train_entry.main(["--config", "configs/tiny_cpu.yaml", *argv, f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and reason in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
