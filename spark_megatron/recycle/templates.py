r"""Prompt templates for recycled tasks: our own phrasings, at least 10 per task and modality.

Slots ($-style, `string.Template`, so LaTeX braces in questions and answers need no escaping):
  $question; $response (one candidate) or $response_a / $response_b (pairwise);
  $what / $What / $whats: "answer" when the judge sees final answers, "solution" when it sees the reasoning.
Every template ends with an instruction to put the verdict or answer in \boxed{}, and never pre-fills a box,
so an echoed instruction cannot be mistaken for the verdict. "image" variants refer to the image(s) that
travel with the task. Labels: pointwise_yes_no -> Yes/No; pointwise_ab -> A (correct) / B (incorrect);
pairwise -> the letter of the correct candidate; reflection -> the original ground truth.
"""
from __future__ import annotations

import string

from spark_megatron.recycle.judgment_templates import (PAIRWISE_IMAGE, PAIRWISE_TEXT, POINTWISE_AB_IMAGE,
                                                       POINTWISE_AB_TEXT, POINTWISE_YES_NO_IMAGE,
                                                       POINTWISE_YES_NO_TEXT)
from spark_megatron.recycle.reflection_templates import (RETRY_IMAGE, RETRY_TEXT, REFLECTION_IMAGE,
                                                         REFLECTION_TEXT)

TASKS = ("pointwise_yes_no", "pointwise_ab", "pairwise", "reflection")
MODALITIES = ("text", "image")

TEMPLATES = {
    ("pointwise_yes_no", "text"): POINTWISE_YES_NO_TEXT,
    ("pointwise_yes_no", "image"): POINTWISE_YES_NO_IMAGE,
    ("pointwise_ab", "text"): POINTWISE_AB_TEXT,
    ("pointwise_ab", "image"): POINTWISE_AB_IMAGE,
    ("pairwise", "text"): PAIRWISE_TEXT,
    ("pairwise", "image"): PAIRWISE_IMAGE,
    ("reflection", "text"): REFLECTION_TEXT,
    ("reflection", "image"): REFLECTION_IMAGE,
}


def template_count(task: str, modality: str) -> int:
    return len(TEMPLATES[(task, modality)])


def render(task: str, modality: str, index: int, *, shows_cot: bool, **slots: str) -> str:
    """Fill template `index` of (task, modality). `shows_cot` picks "solution" vs "answer" wording."""
    what = "solution" if shows_cot else "answer"
    words = {"what": what, "What": what.capitalize(), "whats": what + "s"}
    return string.Template(TEMPLATES[(task, modality)][index]).substitute(words, **slots)


def render_retry(modality: str, question: str, answer: str) -> str:
    template = RETRY_IMAGE if modality == "image" else RETRY_TEXT
    return string.Template(template).substitute(question=question, answer=answer)
