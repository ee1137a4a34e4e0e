"""Supervised warm-up of the quickstart: a few steps of next-token training on ground-truth answers so a tiny
random model produces parseable `\\boxed{}` answers and verdicts before RL starts (otherwise every reward is 0
and GRPO has no signal). Judge and reflection examples are built by the real recycle builder from synthetic
groups (the true answer and perturbed wrong ones), so the warm-up teaches the format of every task kind. With the
Vision-SR1 reward on, image prompts are taught its layout (the ground truth standing in for the description, as
a format teacher) and the text-only follow-up asked from a description, so the perception step has something to
grade from the first RL step.
"""
from __future__ import annotations

import dataclasses
import random

import torch

from spark_megatron.recycle import RecycleBuilder
from spark_megatron.recycle.fitting import PromptFitter
from spark_megatron.types import Rollout, RolloutGroup, TaskKind, Verdict


def nll_token_mean(logprobs, entropy, extras):
    """-sum(logprob over response tokens) / global response-token count (same normalisation as RL)."""
    mask = extras["response_mask"]
    loss = -(logprobs * mask).sum() / extras["global_token_count"]
    return loss, {"nll": loss.detach()}


def _wrong_answer(gt: str, rng: random.Random) -> str:
    try:
        return str(int(gt) + rng.choice([-2, -1, 1, 2]))
    except ValueError:
        return gt + "0"


def _synthetic_group(prompt, rng: random.Random) -> RolloutGroup:
    """A group of 4 'rollouts' mixing the true answer and wrong ones, verified by construction."""
    group = RolloutGroup(prompt)
    n_right = rng.choice([0, 1, 2, 4])
    for i in range(4):
        ans = prompt.ground_truth if i < n_right else _wrong_answer(prompt.ground_truth, rng)
        ok = ans == prompt.ground_truth
        group.rollouts.append(Rollout(prompt, [], [], f"\\boxed{{{ans}}}",
                                      verdict=Verdict(ans, ok, float(ok))))
    return group


def _policy_examples(prompt, cfg) -> list:
    """(Prompt, target) for a policy prompt: the boxed answer, or Vision-SR1's layout and its follow-up."""
    from spark_megatron.verify import perception as sr1

    gt = prompt.ground_truth
    if cfg.algorithm.perception_reward_weight <= 0 or not sr1.eligible(prompt):
        return [(prompt, f"\\boxed{{{gt}}}")]
    layout = f"<description>{gt}</description> <think>{gt}</think> \\boxed{{{gt}}}"
    return [(sr1.with_format_instruction(prompt), layout),
            (sr1.perception_prompt(prompt, gt), f"<think>{gt}</think> \\boxed{{{gt}}}")]


def warmup_examples(prompts: list, cfg, step: int, count: int, rng: random.Random,
                    fitter: PromptFitter = None) -> list:
    """(Prompt, target text) pairs: policy answers plus judge/reflection tasks with their labels (fitted to the
    prompt limit by `fitter`, as recycled tasks are)."""
    picked = rng.sample(prompts, min(count, len(prompts)))
    out = [ex for p in picked for ex in _policy_examples(p, cfg)]
    # reward-task examples even when recycling is off: a GRPO baseline then starts from the same weights as the
    # SPARK run it is compared with
    builder = RecycleBuilder(dataclasses.replace(cfg.algorithm.recycle, enabled=True), seed=cfg.seed + 7919 * step,
                             fitter=fitter)
    result = builder.build([_synthetic_group(p, rng) for p in picked], step)
    out += [(s, f"\\boxed{{{s.ground_truth}}}") for s in result.samples]
    rng.shuffle(out)
    return out


def supervised_warmup(cfg, roles, prompts: list, sequences, is_driver: bool, after_update=None) -> dict:
    """Run `cfg.warmup_sft_steps` optimizer steps of SFT on the actor (every rank builds the same batches);
    `after_update(where)` runs after each step (the trainer's watch on bad updates)."""
    from tqdm import tqdm

    rng = random.Random(cfg.seed)
    tok = roles.tokenizer
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    stats = {"loss": float("nan")}
    fitter = PromptFitter(tok, cfg.rollout.max_prompt_tokens)
    steps = range(cfg.warmup_sft_steps)
    bar = tqdm(steps, desc="warm-up", unit="step", disable=not (is_driver and cfg.logging.progress))
    for step in bar:
        seqs = []
        for prompt, target in warmup_examples(prompts, cfg, step, cfg.data.prompts_per_step, rng, fitter):
            p_ids = roles.render_prompt(prompt)
            r_ids = tok(target, add_special_tokens=False).input_ids + [eos]
            seqs.append(sequences.sft(p_ids, r_ids, kind=TaskKind(prompt.kind).value, prompt=prompt))
        out = roles.actor.train_step(seqs, nll_token_mean)
        stats["loss"] = float(out.get("loss", float("nan")))
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if after_update is not None:
            after_update(f"warm-up step {step + 1}")
    return stats


__all__ = ["supervised_warmup", "nll_token_mean", "warmup_examples", "torch"]
