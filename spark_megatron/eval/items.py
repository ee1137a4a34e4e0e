"""What one evaluation item is, whatever benchmark it came from.

Answer items are scored by the training verifier on the boxed final answer. Judgment items are scored on the
model's verdicts: a single recycled-style judgment (its label is the verdict), or a preference item whose chosen
and rejected responses the model compares with the training's judge templates.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Union

from spark_megatron.types import Prompt


@dataclass
class AnswerItem:
    id: str
    """Stable within the dataset (the benchmark's own id where it has one, else the record index)."""
    prompt: Prompt
    """System turn + question (+ instruction) with its images; ground_truth is what the verifier checks."""
    letter_set: bool = False
    """The answer is a set of option letters ("A, C"), scored regardless of order (LogicVista)."""
    subset: Optional[str] = None


@dataclass
class JudgmentItem:
    """One judge task whose label is the verdict (Yes/No or A/B), e.g. recycled tasks from held-out rollouts."""

    id: str
    prompt: Prompt
    """The rendered judge prompt; ground_truth is the verdict label."""
    subset: Optional[str] = None


@dataclass
class PreferenceItem:
    """A question with responses ranked by the benchmark: every chosen response must beat every rejected one."""

    id: str
    question: Prompt
    """The question as a prompt (its messages carry the images); ground_truth unused."""
    chosen: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    subset: Optional[str] = None


Item = Union[AnswerItem, JudgmentItem, PreferenceItem]


def item_prompt(item: Item) -> Prompt:
    return item.question if isinstance(item, PreferenceItem) else item.prompt


def prompt_hash(item: Item) -> str:
    """Hash of what the model is asked (messages, image paths, responses to judge): a changed record under the
    same id is visible in items.jsonl."""
    p = item_prompt(item)
    payload = {"messages": p.messages, "images": [i.path for i in p.images], "truth": p.ground_truth}
    if isinstance(item, PreferenceItem):
        payload.update(chosen=item.chosen, rejected=item.rejected)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
