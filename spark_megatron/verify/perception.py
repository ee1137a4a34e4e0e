"""Vision-SR1-style visual-perception reward (optional reward term).

A rollout answers in the form ``<description>what the image shows</description> <think>...</think> \\boxed{x}``.
The description alone (no image) plus the question goes back to the same model; if that text-only answer is
right, the description captured what the question needed and the rollout earns the perception reward.
total = accuracy_weight * accuracy + format_weight * format + perception_weight * perception
(0.9 / 0.1 / 1.0 in Vision-SR1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from spark_megatron.types import Prompt, TaskKind
from spark_megatron.verify.extraction import extract_boxed

_DESCRIPTION = re.compile(r"<description>(.*?)</description>", re.DOTALL | re.IGNORECASE)
_SR1_LAYOUT = re.compile(r"^\s*<description>.+?</description>\s*<think>.+?</think>.*\\box(?:ed)?\s*\{",
                         re.DOTALL | re.IGNORECASE)

_FOLLOW_UP = ("You cannot see the image, but here is a description of it:\n{description}\n\n"
              "Using only this description, answer the question below. Reason briefly and put the final answer "
              "in \\boxed{{}}.\n\nQuestion: {question}")


@dataclass
class PerceptionWeights:
    accuracy: float = 0.9
    format: float = 0.1
    perception: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "PerceptionWeights":
        """From an `AlgorithmConfig`: accuracy = 1 - format_reward_weight."""
        return cls(1.0 - cfg.format_reward_weight, cfg.format_reward_weight, cfg.perception_reward_weight)


def extract_description(response_text: str) -> Optional[str]:
    """Text inside the first ``<description>...</description>``, stripped; None if absent or empty."""
    m = _DESCRIPTION.search(response_text or "")
    if m is None or not m.group(1).strip():
        return None
    return m.group(1).strip()


def sr1_format_score(response_text: str) -> float:
    """1.0 for description, then think, then a boxed answer, in that order; else 0.0."""
    ok = _SR1_LAYOUT.search(response_text or "") is not None and extract_boxed(response_text) is not None
    return 1.0 if ok else 0.0


def perception_prompt(prompt: Prompt, description: str) -> Prompt:
    """Text-only follow-up: the description stands in for the image(s); same ground truth."""
    from spark_megatron.recycle.question import question_text  # recycle owns question extraction

    text = _FOLLOW_UP.format(description=description, question=question_text(prompt))
    return Prompt(uid=f"{prompt.uid}/perception", messages=[{"role": "user", "content": text}],
                  ground_truth=prompt.ground_truth, images=[], kind=TaskKind.POLICY, origin_uid=prompt.uid)


def combine_perception_reward(accuracy: float, fmt: float, perception: float,
                              weights: Optional[PerceptionWeights] = None) -> float:
    weights = weights or PerceptionWeights()
    return weights.accuracy * accuracy + weights.format * fmt + weights.perception * perception


def perception_rewards(prompts: Sequence[Prompt], responses: Sequence[str], accuracy: Sequence[float],
                       generate: Callable[[list], list], verifier,
                       weights: Optional[PerceptionWeights] = None) -> list[float]:
    """Total SR1 reward per (prompt, response); one batched `generate` call for all follow-ups.

    `generate(list of message lists) -> list of texts`; `verifier` is a `Verifier`. Responses without a
    description get perception 0 and no follow-up generation.
    """
    descriptions = [extract_description(r) for r in responses]
    asks = [i for i, d in enumerate(descriptions) if d is not None]
    follow_ups = [perception_prompt(prompts[i], descriptions[i]) for i in asks]
    texts = generate([p.messages for p in follow_ups]) if follow_ups else []
    verdicts = verifier.verify_batch([(t, p.ground_truth) for t, p in zip(texts, follow_ups)])
    perception = [0.0] * len(responses)
    for i, v in zip(asks, verdicts):
        perception[i] = 1.0 if v.correct else 0.0
    return [combine_perception_reward(a, sr1_format_score(r), p, weights)
            for a, r, p in zip(accuracy, responses, perception)]
