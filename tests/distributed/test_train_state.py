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
    save_train_state(actor, step_dir(run_dir, 1), EXTRA, keep_last=2)
    return oracle.portable(_continue(actor))


def _load_worker(rank, world, hf_dir, ckpt):
    from spark_megatron.checkpoint.train_state import load_train_state
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.train.actor import Actor

    out = {}
    for tp in (2, 1):
        init_distributed(tp=tp, pp=1, seed=99)  # other seeds: the checkpoint must restore the RNG
        random.seed(7)
        actor = Actor(*oracle.configs(tp, 1, mbs=2), hf_dir, total_steps=10)
        out[f"extra{tp}"] = load_train_state(actor, ckpt)
        out[f"tp{tp}"] = _continue(actor)
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
    resharded = loaded[0]["tp1"]  # TP2 x DP1 checkpoint -> TP1 x DP2
    for x, y in zip(saved[0]["losses"], resharded["losses"]):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (x, y)
    worst = max(float((v - resharded["params"][k]).abs().max()) for k, v in saved[0]["params"].items())
    assert worst < 5e-5, worst
