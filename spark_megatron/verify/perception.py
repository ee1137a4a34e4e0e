"""Vision-SR1 visual-perception reward: an optional reward term, on when algorithm.perception_reward_weight > 0.

For each rollout of an image (VL) policy prompt, the policy answers as
``<description>what the image shows</description> <think>reasoning</think> \\boxed{answer}``. Its description
alone, with the question and no image, goes back to the same policy (one sample, the same engine and sampling
settings); the text-only answer is graded by the same verifier against the same ground truth. If it is right,
the description carried what the question needed, and the rollout earns the perception reward:

    reward = (1 - w_f) * accuracy + w_f * format + w_p * perception

w_f = algorithm.format_reward_weight and w_p = algorithm.perception_reward_weight (Vision-SR1: 0.1 and 1.0, its
total being 0.9 * accuracy + 0.1 * format + perception); format is Vision-SR1's layout rule (`sr1_format_score`)
for these rollouts. Text prompts and recycled tasks keep the verifier's reward, (1 - w_f) * accuracy + w_f * (a
boxed answer is present). Image policy prompts that do not ask for the layout already get FORMAT_INSTRUCTION
appended for the rollout; the groups get their original prompts back afterwards, so recycled tasks quote the
question as the data wrote it. The text-only follow-ups are scored, never trained on (as in Vision-SR1).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from spark_megatron.types import Prompt, RolloutGroup, TaskKind

_DESCRIPTION = re.compile(r"<description>(.*?)</description>", re.DOTALL | re.IGNORECASE)
_TAG_SPACING = re.compile(r"\s*([<>/])\s*")
_SR1_LAYOUT = re.compile(r"\s*<description>.*?</description>\s*<think>.*?</think>\s*\\boxed\{.*\}\s*", re.DOTALL)

FORMAT_INSTRUCTION = ("First describe everything in the image that the question needs, in enough detail that "
                      "someone who cannot see the image could answer from your description alone, inside "
                      "<description> </description>. Then reason step by step inside <think> </think>. Finally "
                      "give only the final answer in \\boxed{}. Layout: <description> ... </description> "
                      "<think> ... </think> \\boxed{...}")
"""Appended to image policy prompts that do not already ask for a <description>."""

_FOLLOW_UP = ("Description of an image you cannot see:\n{description}\n\nQuestion: {question}\n\nAnswer the "
              "question from the description alone. Reason step by step inside <think> </think>, then give only "
              "the final answer in \\boxed{{}}.")


@dataclass
class PerceptionWeights:
    accuracy: float = 0.9
    format: float = 0.1
    perception: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "PerceptionWeights":
        """From an `AlgorithmConfig`: accuracy = 1 - format_reward_weight, format = format_reward_weight,
        perception = perception_reward_weight."""
        return cls(1.0 - cfg.format_reward_weight, cfg.format_reward_weight, cfg.perception_reward_weight)

    def total(self, accuracy: float, fmt: float, perception: float) -> float:
        return self.accuracy * accuracy + self.format * fmt + self.perception * perception


def extract_description(response_text: str) -> Optional[str]:
    """Text inside the first ``<description>...</description>``, stripped; None if absent or empty."""
    m = _DESCRIPTION.search(response_text or "")
    if m is None or not m.group(1).strip():
        return None
    return m.group(1).strip()


def sr1_format_score(response_text: str) -> float:
    """Vision-SR1's format rule: 1.0 when the whole response is a description block, then a think block, then
    one \\boxed{...} that ends it (only whitespace between and around; spaces next to '<', '>' and '/' are
    ignored, so "< /think >" counts as "</think>"); else 0.0."""
    text = _TAG_SPACING.sub(r"\1", response_text or "")
    return 1.0 if _SR1_LAYOUT.fullmatch(text) else 0.0


def eligible(prompt: Prompt) -> bool:
    """A policy prompt with images: the prompts Vision-SR1's reward applies to."""
    return TaskKind(prompt.kind) is TaskKind.POLICY and bool(prompt.images)


def with_format_instruction(prompt: Prompt) -> Prompt:
    """`prompt` asking for Vision-SR1's layout: FORMAT_INSTRUCTION appended to its last user text (unchanged if
    it already mentions <description>)."""
    from spark_megatron.data.question import question_text

    if "<description>" in question_text(prompt):
        return prompt
    messages = [dict(m) for m in prompt.messages]
    user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    content = messages[user]["content"]
    if isinstance(content, str):
        messages[user]["content"] = f"{content.rstrip()}\n\n{FORMAT_INSTRUCTION}"
    else:
        messages[user]["content"] = list(content) + [{"type": "text", "text": FORMAT_INSTRUCTION}]
    return dataclasses.replace(prompt, messages=messages)


def perception_prompt(prompt: Prompt, description: str) -> Prompt:
    """Text-only follow-up: the description stands in for the image(s); same ground truth, no images."""
    from spark_megatron.data.question import question_text

    text = _FOLLOW_UP.format(description=description, question=question_text(prompt))
    return Prompt(uid=f"{prompt.uid}/perception", messages=[{"role": "user", "content": text}],
                  ground_truth=prompt.ground_truth, images=[], kind=TaskKind.POLICY, origin_uid=prompt.uid)


Generate = Callable[[list, object], list]
"""(requests, sampling spec) -> RolloutGroups: a rollout engine's `generate`."""


class PerceptionReward:
    """The Vision-SR1 step of a training step, on the rank that holds the engine and the verifier:

        prompts = perception.prompts(prompts)            # before the rollout
        groups = engine.generate(prompts, sampling); verify(groups)
        perception.apply(groups, engine.generate)        # rewards rewritten in place

    A no-op (prompts unchanged, rewards untouched) when algorithm.perception_reward_weight is 0.
    `sampling` is the step's SamplingSpec; follow-ups use it with n = 1.
    """

    def __init__(self, algo_cfg, verifier, sampling):
        self.enabled = algo_cfg.perception_reward_weight > 0
        self.weights = PerceptionWeights.from_config(algo_cfg)
        self.verifier = verifier
        self.sampling = dataclasses.replace(sampling, n=1) if sampling is not None else None
        self._originals: dict = {}

    def prompts(self, prompts: Sequence[Prompt]) -> list:
        """The prompts to sample: eligible ones ask for the layout (their originals are kept for `apply`)."""
        if not self.enabled:
            return list(prompts)
        out = []
        for p in prompts:
            if eligible(p):
                self._originals[p.uid] = p
                p = with_format_instruction(p)
            out.append(p)
        return out

    def apply(self, groups: Sequence[RolloutGroup], generate: Generate) -> None:
        """Ask the follow-ups (one batched `generate` call), rewrite the eligible rollouts' verdicts (reward,
        format_score, perception) and put the original prompts back on the groups.

        With data-parallel engines every rank calls with the same groups (the follow-ups are then identical, as
        the collective `generate` needs); a rank without the verifier, or to which `generate` returns None (not
        the fleet's driver), only restores the prompts: the driver grades and broadcasts."""
        if not self.enabled:
            return
        todo = [(g, r) for g in groups if eligible(g.prompt) for r in g.rollouts if r.verdict is not None]
        originals = {g.prompt.uid: self._originals.pop(g.prompt.uid, g.prompt)
                     for g in groups if eligible(g.prompt)}
        asks = [(k, extract_description(r.response_text)) for k, (_, r) in enumerate(todo)]
        asks = [(k, d) for k, d in asks if d is not None]
        follow_ups = [perception_prompt(originals[todo[k][0].prompt.uid], d) for k, d in asks]
        replies = generate(follow_ups, self.sampling) if follow_ups else []
        if self.verifier is not None and replies is not None:  # the rank that grades (the fleet's driver)
            answers = [g.rollouts[0].response_text if g.rollouts else "" for g in replies]
            verdicts = self.verifier.verify_batch([(a, p.ground_truth) for a, p in zip(answers, follow_ups)])
            perceived = {k: float(v.correct) for (k, _), v in zip(asks, verdicts)}
            for k, (_, r) in enumerate(todo):
                fmt, p = sr1_format_score(r.response_text), perceived.get(k, 0.0)
                r.verdict = dataclasses.replace(r.verdict, format_score=fmt, perception=p,
                                                reward=self.weights.total(float(r.verdict.correct), fmt, p))
        for g in groups:
            if g.prompt.uid in originals:
                g.prompt = originals[g.prompt.uid]
                for r in g.rollouts:
                    r.prompt = g.prompt


def perception_metrics(groups: Sequence[RolloutGroup]) -> dict:
    """Means over the rollouts that got a perception verdict: perception reward (the text-only answer was
    right), SR1 format rate, share that wrote a description, total reward, and their count; {} when none did."""
    done = [r for g in groups for r in g.rollouts if r.verdict is not None and r.verdict.perception is not None]
    if not done:
        return {}
    n = len(done)
    return {"perception/reward": sum(r.verdict.perception for r in done) / n,
            "perception/format_rate": sum(r.verdict.format_score for r in done) / n,
            "perception/description_rate": sum(extract_description(r.response_text) is not None for r in done) / n,
            "perception/total_reward": sum(r.verdict.reward for r in done) / n,
            "perception/rollouts": float(n)}
