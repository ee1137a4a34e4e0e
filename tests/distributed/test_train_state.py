"""Train-state checkpoints on real gloo ranks: save at step 1, continue 2 steps; a fresh job loads the
checkpoint and continues the same 2 steps -> bit-identical losses, parameters and RNG draws at the same layout
(TP2), and the same within float noise after resharding to TP1 x DP2. Half-written checkpoint directories are
never picked up."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from spark_megatron.parallel.spawn import run_on_ranks
from tests.distributed import actor_oracle as oracle

pytestmark = pytest.mark.distributed
EXTRA = {"step": 1, "data_cursor": 17, "recycle_queue": [{"uid": "p:3/pointwise"}], "policy_version": 1}


def _continue(actor, steps=(2, 3)) -> dict:
    """Two more optimizer steps on fixed data, then the resulting params, losses and RNG draws."""
    import numpy as np

    losses = [actor.optimizer_step(oracle.make_seqs(400, n=6, seed=s), oracle.token_mean_loss)["loss"]
              for s in steps]
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    return {"losses": losses, "params": oracle.exported(actor), "draws": draws, "lr": actor.scheduler.get_lr(
        actor.optimizer.param_groups[0])}


def _save_worker(rank, world, hf_dir, run_dir):
    from spark_megatron.checkpoint.train_state import save_train_state, step_dir
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.train.actor import Actor

    init_distributed(tp=2, pp=1, seed=3)
    actor = Actor(*oracle.configs(2, 1, mbs=2), hf_dir, total_steps=10)
    actor.optimizer_step(oracle.make_seqs(400, n=6, seed=1), oracle.token_mean_loss)
    random.seed(100 + rank)
    saved_lp = actor.compute_logprobs(oracle.make_seqs(400, n=4, seed=9))
    save_train_state(actor, step_dir(run_dir, 1), EXTRA, keep_last=2)
    return oracle.portable({**_continue(actor), "saved_lp": saved_lp})


def _load_worker(rank, world, hf_dir, ckpt):
    from spark_megatron.checkpoint.train_state import load_train_state
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.roles import megatron_start
    from spark_megatron.train.actor import Actor

    out = {}
    for tp in (2, 1):
        init_distributed(tp=tp, pp=1, seed=99)  # other seeds: the checkpoint must restore the RNG
        random.seed(7)
        actor = Actor(*oracle.configs(tp, 1, mbs=2), hf_dir, total_steps=10)
        out[f"extra{tp}"] = load_train_state(actor, ckpt)
        out[f"tp{tp}"] = _continue(actor)
    model_cfg, par, optim = oracle.configs(1, 1, mbs=2)
    model_cfg.megatron_path = ckpt  # model weights straight from the trainer checkpoint, no HF directory
    start = megatron_start(model_cfg)  # as the roles pass it
    out["from_megatron_lp"] = Actor(model_cfg, par, optim, None, start=start).compute_logprobs(
        oracle.make_seqs(400, n=4, seed=9))
    return oracle.portable(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2

    return str(write_tiny_qwen2(tmp_path_factory.mktemp("ts"), TinyQwen2Spec(num_hidden_layers=2)))


def test_resume_is_exact(tiny, tmp_path):
    from spark_megatron.checkpoint.train_state import find_latest_complete, step_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = [oracle.restore(r) for r in run_on_ranks(_save_worker, 2, tiny, str(run_dir), timeout_s=300)]
    ckpt = step_dir(run_dir, 1)
    assert find_latest_complete(run_dir) == ckpt
    assert (run_dir / "latest").read_text().strip() == ckpt.name
    assert (ckpt / "tokenizer.json").is_file()  # exportable to HF as is
    # half-written neighbours with later steps must be ignored
    shutil.copytree(ckpt, run_dir / "step_00000009.tmp-12345")
    shutil.copytree(ckpt, step_dir(run_dir, 8))
    (step_dir(run_dir, 8) / "complete").unlink()
    assert find_latest_complete(run_dir) == ckpt

    loaded = [oracle.restore(r) for r in run_on_ranks(_load_worker, 2, tiny, str(ckpt), timeout_s=300)]
    for rank in range(2):
        a, b = saved[rank], loaded[rank]["tp2"]
        assert loaded[rank]["extra2"] == EXTRA and loaded[rank]["extra1"] == EXTRA
        assert a["losses"] == b["losses"]
        assert a["draws"] == b["draws"]  # python / numpy / torch RNG restored per rank
        assert a["lr"] == b["lr"]
        for k, v in a["params"].items():
            assert torch.equal(v, b["params"][k]), k
    for a, b in zip(saved[0]["saved_lp"], loaded[0]["from_megatron_lp"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    resharded = loaded[0]["tp1"]  # TP2 x DP1 checkpoint -> TP1 x DP2
    for x, y in zip(saved[0]["losses"], resharded["losses"]):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (x, y)
    worst = max(float((v - resharded["params"][k]).abs().max()) for k, v in saved[0]["params"].items())
    assert worst < 5e-5, worst

    # the conversion tool exports the trainer checkpoint to a plain HF model with the saved weights
    from spark_megatron.checkpoint.hf_export import export_megatron_to_hf

    export_megatron_to_hf(str(ckpt), str(tmp_path / "hf"), workers=1, progress=False, timeout_s=300)
    with torch.no_grad():
        hf_lp, _ = oracle.hf_logprobs_entropy(oracle.hf_model(tmp_path / "hf"), oracle.make_seqs(400, n=4, seed=9))
    for a, b in zip(saved[0]["saved_lp"], hf_lp):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.unit
def test_discovery_and_pruning(tmp_path):
    """Only complete checkpoints count (by step, not by name or `latest`); pruning keeps the newest."""
    from spark_megatron.checkpoint.megatron_format import CheckpointMeta
    from spark_megatron.checkpoint.train_state import (complete_checkpoints, find_latest_complete, prune,
                                                       step_dir, write_latest)

    def fake(step, complete=True, name=None):
        d = tmp_path / name if name else step_dir(tmp_path, step)
        d.mkdir()
        (d / "spark_meta.json").write_text(CheckpointMeta(family="qwen2", hf_config={}, padded_vocab_size=512,
                                                          dtype="float32", step=step).to_json())
        if complete:
            (d / "complete").write_text(json.dumps({"step": step}))
        return d

    assert find_latest_complete(tmp_path) is None and find_latest_complete(tmp_path / "missing") is None
    fake(2), fake(10), fake(30, name="renamed_by_hand")
    fake(40, complete=False)                        # crashed before the marker
    fake(50, name="step_00000050.tmp-4242")         # temp dir of an unfinished save
    fake(60, name="step_00000060.old-4242")         # old copy being replaced
    write_latest(tmp_path, "step_00000002")         # a stale pointer does not hide newer checkpoints
    assert find_latest_complete(tmp_path).name == "renamed_by_hand"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000010",
                                                                "renamed_by_hand"]
    removed = prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step_00000002"] and not step_dir(tmp_path, 2).exists()
    assert step_dir(tmp_path, 40).exists()          # incomplete dirs are not the pruner's business
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"


@pytest.mark.unit
def test_bad_inputs_fail_with_one_line(tmp_path):
    from spark_megatron.checkpoint.train_state import load_train_state, save_train_state
    from spark_megatron.models.weights import CheckpointError

    with pytest.raises(ValueError, match=r"extra_state\['queue'\] is not JSON-serialisable"):
        save_train_state(None, tmp_path / "x", {"step": 1, "queue": {1, 2}})
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="not a complete train-state checkpoint"):
        load_train_state(None, tmp_path / "half")
