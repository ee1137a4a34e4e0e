"""SPARK-VL end to end on CPU: a tiny random Qwen2.5-VL, the Megatron VL actor at TP2 on real gloo ranks, HF
transformers rollouts on the synthetic image task (vLLM's Qwen2.5-VL needs a CUDA torchvision, see roles.py).

The test drives the trainer's own `fit()`. After the warm-up (the first push) and after every step:
- the rollout engine's parameters equal the actor's exported HF weights bit for bit (vision tower included);
- fresh image rollouts, re-scored by the actor, give the engine's own sampling logprobs (the engine's HF
  generate with its image pipeline and mRoPE decoding vs the Megatron actor's prepared images and 3-D positions);
the loss is finite, the weights moved, recycled tasks were trained and carried their images, and the image
cache encoded images. The run has the Vision-SR1 reward on: every step writes its perception metrics over all the
policy rollouts, and rollouts in its layout get text-only follow-ups from the real engine, graded and added.
"""
import math

import pytest
import torch

from spark_megatron.parallel.spawn import run_on_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]
TOL = 1e-4


def _overrides(out_dir, tp):
    return [f"output_dir={out_dir}", "total_steps=2", "warmup_sft_steps=2", f"parallel.tensor_model_parallel_size={tp}",
            "data.prompts_per_step=4", "checkpoint.save_interval=0", "logging.progress=false",
            "logging.wandb_project=null", "logging.tensorboard=false", 'data.train_files=["synthetic:shapes?n=16"]',
            "algorithm.perception_reward_weight=1.0", "algorithm.format_reward_weight=0.1"]


def _perception_follow_up(trainer, prompt) -> dict:
    """Two rollouts in Vision-SR1's layout (right answer; one description says it, one does not) through the
    trainer's perception step with the real engine: text-only follow-ups, graded, rewards rewritten."""
    from spark_megatron.types import Rollout, RolloutGroup
    from spark_megatron.verify.perception import perception_metrics

    if trainer.roles.verifier is None:  # the driver grades (every rank holds an HF engine of its own)
        return {}
    gt = prompt.ground_truth
    texts = [f"<description>There are {gt} squares.</description> <think>{gt}</think> \\boxed{{{gt}}}",
             f"<description>Some squares.</description> <think>count</think> \\boxed{{{gt}}}"]
    asked = trainer.perception.prompts([prompt])[0]
    group = RolloutGroup(asked, [Rollout(asked, [], [], t) for t in texts])
    for r, v in zip(group.rollouts, trainer.roles.verifier.verify_batch([(t, gt) for t in texts])):
        r.verdict = v
    calls = []

    def generate(requests, sampling):
        calls.append([len(r.images) for r in requests])
        return trainer.roles.engine.generate(requests, sampling)

    trainer.perception.apply([group], generate)
    return {"calls": calls, "rewards": [r.verdict.reward for r in group.rollouts],
            "perception": [r.verdict.perception for r in group.rollouts], "metrics": perception_metrics([group]),
            "restored": group.prompt is prompt}


def _weights_match_engine(trainer) -> bool:
    """Every rank iterates the TP-gathering export; the driver compares with the engine's live parameters."""
    from spark_megatron.models.weights import export_hf_weights

    actor = trainer.roles.actor
    registry = actor.mappings()
    engine = trainer.roles.engine
    live = engine.named_checkpoint_tensors() if engine is not None else None
    ok, seen = True, set()
    for name, t in export_hf_weights(actor.model_chunks[0], registry, actor.shape.tie_word_embeddings):
        seen.add(name)
        if live is not None:
            ok = ok and name in live and torch.equal(live[name], t)
    return ok and (live is None or seen == set(live))


def _rollout_logprob_gap(trainer, prompts) -> float:
    """max |engine sampling logprob - actor logprob| over fresh rollouts of image prompts."""
    from spark_megatron.controller import broadcast
    from spark_megatron.rollout.engine import SamplingSpec

    groups = None
    if trainer.roles.engine is not None:
        groups = trainer.roles.engine.generate(prompts, SamplingSpec(n=2, max_tokens=8, seed=5))
    groups = broadcast(groups)
    seqs = trainer.sequences.build(groups)
    assert seqs and all(s.images for s in seqs)
    actor_lp = trainer.roles.actor.compute_logprobs(seqs)
    return max(float((a - torch.tensor(s.rollout_logprobs)).abs().max()) for a, s in zip(actor_lp, seqs))


def vl_loop_worker(rank, world, out_dir):
    import torch.distributed as dist

    from spark_megatron.config import load_config
    from spark_megatron.controller import SparkTrainer
    from spark_megatron.launch.train_entry import prepare_model_dir
    from spark_megatron.parallel.groups import init_distributed

    cfg = load_config("configs/tiny_vl_cpu.yaml", _overrides(out_dir, world))
    init_distributed(cfg.parallel.tensor_model_parallel_size, 1, seed=cfg.seed)
    box = [prepare_model_dir(cfg) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    trainer = SparkTrainer(cfg, box[0])
    built, build = [], trainer.sequences.build

    def recording_build(groups):
        seqs = build(groups)
        built.extend((s.kind, bool(s.images)) for s in seqs)
        return seqs

    trainer.sequences.build = recording_build
    probe = trainer.state.prompts[:2]
    out, push = [], trainer.roles.push_weights

    def first_push():  # the warmed-up weights, before step 1 (later pushes are checked after each step)
        push()
        if not out:
            out.append({"synced": _weights_match_engine(trainer), "gap": _rollout_logprob_gap(trainer, probe),
                        "params": [p.detach().clone() for p in trainer.roles.actor.model_chunks[0].parameters()]})

    def on_step(step, row):
        moved = max((p.detach() - q).abs().max().item()
                    for p, q in zip(trainer.roles.actor.model_chunks[0].parameters(), out[0]["params"]))
        out.append({"row": row, "moved": moved, "synced": _weights_match_engine(trainer),
                    "gap": _rollout_logprob_gap(trainer, probe)})

    trainer.roles.push_weights = first_push
    trainer.fit(on_step)
    del out[0]["params"]
    out.append({"built": built, "encoded": trainer.roles.actor.image_cache.images_encoded,
                "sr1": _perception_follow_up(trainer, probe[0])})
    trainer.close()
    return out


def test_spark_vl_loop_tp2_engine_tracks_actor(tmp_path):
    first, *steps, final = run_on_ranks(vl_loop_worker, 2, str(tmp_path / "run"), timeout_s=900,
                                        env={"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                                             "SPARK_SYNTHETIC_DIR": str(tmp_path / "images")})[0]
    assert first["synced"], "engine weights differ from the warmed-up actor's"
    assert first["gap"] <= TOL, first
    assert len(steps) == 2
    for s in steps:
        row = s["row"]
        assert math.isfinite(row["policy/loss"]) and math.isfinite(row["policy/grad_norm"])
        assert s["moved"] > 0
        assert s["synced"], f"engine weights differ from the actor's after step {steps.index(s) + 1}"
        assert s["gap"] <= TOL, s["gap"]
        assert 0 <= row["policy/accuracy"] <= 1
        # Vision-SR1: every policy rollout (4 image prompts x n 4) got the perception step; metrics are written
        assert row["perception/rollouts"] == 16, row
        assert all(0 <= row[f"perception/{k}"] <= 1 for k in ("reward", "format_rate", "description_rate"))
        assert row["time/perception_s"] >= 0
    assert sum(s["row"].get("reward/sequences", 0) for s in steps) > 0, "no recycled task was trained"
    kinds = {k for k, has_images in final["built"] if has_images}
    assert "policy" in kinds and kinds & {"pointwise", "pairwise", "reflection"}, kinds
    assert all(has_images for _, has_images in final["built"]), "a sequence of the image task lost its images"
    assert final["encoded"] > 0
    sr1 = final["sr1"]
    assert sr1["calls"] == [[0, 0]], sr1  # one batched call, one text-only follow-up per described rollout
    assert sr1["metrics"]["perception/format_rate"] == 1.0 and sr1["restored"]
    for reward, perceived in zip(sr1["rewards"], sr1["perception"]):  # 0.9 * 1 + 0.1 * 1 + 1.0 * perception
        assert perceived in (0.0, 1.0) and reward == pytest.approx(1.0 + perceived)


def test_vllm_engine_for_a_vl_model_on_cpu_is_refused_before_any_rank_starts(tmp_path, capsys):
    from spark_megatron.launch.train_entry import main

    if torch.cuda.is_available():
        pytest.skip("vLLM serves Qwen2.5-VL where CUDA is present")
    rc = main(["--config", "configs/tiny_vl_cpu.yaml", f"output_dir={tmp_path}", "rollout.engine=vllm"])
    assert rc == 2
    assert "rollout.engine=vllm cannot serve Qwen2.5-VL on a CPU machine" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()
