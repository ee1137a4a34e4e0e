"""Typed samples that flow through one SPARK step.

prompts -> rollout -> verify -> advantages -> [recycle -> queue] -> logprobs -> loss -> step -> sync

Every stage consumes and produces these objects; nothing travels as a free-form dict.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional


class TaskKind(str, enum.Enum):
    """What a prompt asks the model to do; recycled kinds are built from policy rollouts."""

    POLICY = "policy"
    POINTWISE = "pointwise"
    PAIRWISE = "pairwise"
    REFLECTION = "reflection"

    @property
    def recycled(self) -> bool:
        return self is not TaskKind.POLICY


@dataclass(frozen=True)
class ImageRef:
    """An image referenced by a prompt (loaded lazily by the data/image code)."""

    path: str
    """Local file path (absolute, or resolved against the data file's directory by the reader)."""
    max_pixels: Optional[int] = None
    """Per-image pixel budget from the record (qwen-vl-utils sizing); None = processor default."""
    min_pixels: Optional[int] = None
    """Per-image lower pixel bound; None = processor default."""


@dataclass
class Prompt:
    """One verifiable task: chat messages plus the ground truth the verifier checks against."""

    uid: str
    """Stable id, `<source>:<index>` for data records, `<origin uid>/<kind>` for recycled tasks."""
    messages: list
    """Chat messages; content is a string or a list of {type: text|image, ...} parts (Qwen style)."""
    ground_truth: str
    """Answer (policy tasks) or label (Yes/No, A/B, or the original answer for reflection)."""
    images: list = field(default_factory=list)
    """ImageRef objects, in the order their placeholders appear in `messages`."""
    kind: TaskKind = TaskKind.POLICY
    """Task kind; recycled kinds are never recycled again."""
    origin_uid: Optional[str] = None
    """For recycled tasks: uid of the policy prompt whose rollouts produced this task."""


@dataclass
class Verdict:
    """The verifier's judgment of one response."""

    extracted: Optional[str]
    """Final answer taken from the first brace-matched \\boxed{...}; None if there is none."""
    correct: bool
    """Whether `extracted` is equivalent to the ground truth."""
    reward: float
    """Scalar reward used for the advantage (accuracy plus optional format/perception terms)."""
    timed_out: bool = False
    """True when the equivalence check was cut off by the per-item timeout (counted as wrong)."""
    format_score: Optional[float] = None
    """Vision-SR1 rollouts: the layout score in `reward` (verify.perception.sr1_format_score); None otherwise."""
    perception: Optional[float] = None
    """Vision-SR1 rollouts: 1.0 if the text-only answer from the rollout's description was right; None otherwise."""


@dataclass
class Rollout:
    """One sampled response to a prompt."""

    prompt: Prompt
    prompt_token_ids: list
    """Token ids of the rendered prompt (chat template applied, image pads expanded for VL)."""
    response_token_ids: list
    """Sampled token ids (without the prompt)."""
    response_text: str
    logprobs: Optional[list] = None
    """Rollout engine's logprob of each sampled token (same length as response_token_ids)."""
    finish_reason: str = "stop"
    """'stop' or 'length'."""
    policy_version: int = 0
    """Weight version of the engine that produced this rollout (incremented on every push)."""
    verdict: Optional[Verdict] = None
    """Filled in by the verifier."""


@dataclass
class RolloutGroup:
    """The n rollouts of one prompt: the unit of GRPO normalisation and of recycling."""

    prompt: Prompt
    rollouts: list = field(default_factory=list)

    @property
    def rewards(self) -> list:
        return [r.verdict.reward if r.verdict else 0.0 for r in self.rollouts]

    @property
    def correct(self) -> list:
        return [bool(r.verdict and r.verdict.correct) for r in self.rollouts]
