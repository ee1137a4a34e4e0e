"""Scoring rules: the training verifier for answers, the training judge templates for reward benchmarks.

Answers: the training verifier's verdict (every boxed answer must be the ground truth: hedges are wrong; the
same rule training rewards). Multiple-choice ground truths carry the option's content where the benchmark accepts
it ("(B) 5": the verifier takes the letter or the value). The one benchmark rule beyond the verifier: LogicVista's
multi-answer questions ("A, C") compare option-letter sets regardless of order, every box naming the same set.

Judgments: a verdict is the choice label of the judge's boxed answer (Yes/No, A/B), checked by the verifier
exactly as recycled judge tasks are rewarded. A verdict that is neither label is unparsable: wrong, and counted.

Preference items (reward benchmarks) with chosen responses C and rejected responses R:
- pairwise (default): one pairwise judgment per (c, r) pair, A/B order drawn per pair from a seeded coin; the item
  is right only if every chosen response wins every comparison. For RewardBench2's best-of-4 (1 chosen, 3
  rejected) that is its own rule (the chosen response must outrank all three), reduced to the 3 comparisons a
  pairwise judge can make; chance level is 1/8 instead of a scalar reward model's 1/4, because the comparisons
  are not forced to be transitive. VL-RewardBench (one pair) is plain pairwise accuracy.
- pointwise: one Yes/No judgment per response; right only if every chosen response gets Yes and every rejected
  one No. Equal verdicts on a chosen and a rejected response are a tie: wrong, and counted.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

from spark_megatron.eval.items import AnswerItem, JudgmentItem, PreferenceItem
from spark_megatron.data import question as q
from spark_megatron.recycle import templates
from spark_megatron.types import Prompt, TaskKind
from spark_megatron.verify import VerifyRequest, choice_label, extract_boxes

_LETTER = re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])")


def letter_set(text: Optional[str]) -> frozenset:
    """{'A', 'C'} from 'A, C', '(C) and (A)', '\\text{A,C}'; empty for text without standalone option letters."""
    if not text:
        return frozenset()
    return frozenset(_LETTER.findall(text.replace("\\text", " ").upper()))


def answer_correct(item: AnswerItem, verdict, response: str) -> bool:
    """The training verifier's verdict, plus set comparison for letter-set answers (see module doc)."""
    if verdict.correct or not item.letter_set or verdict.timed_out:
        return verdict.correct
    boxes = extract_boxes(response)
    want = letter_set(item.prompt.ground_truth)
    return bool(boxes) and all(letter_set(b) == want for b in boxes)


# ---------------------------------------------------------------------------------------------- judgments

@dataclass
class JudgeRequest:
    """One judgment the model makes for an item: the prompt and the verdict that counts as right."""

    prompt: Prompt
    label: str
    """Yes/No (pointwise) or A/B (pairwise)."""
    role: str
    """chosen | rejected (pointwise), pair (pairwise), task (a labelled judgment record)."""


def _modality(p: Prompt) -> str:
    return "image" if q.has_images(p) else "text"


def pairwise_request(question: Prompt, first: str, second: str, label: str, template: int) -> JudgeRequest:
    """The training's pairwise template (full responses shown: the 'solution' wording)."""
    text = templates.render("pairwise", _modality(question), template, shows_cot=True,
                            question=q.question_text(question), response_a=first, response_b=second)
    return JudgeRequest(_judge_prompt(question, text, label, TaskKind.PAIRWISE), label, "pair")


def pointwise_request(question: Prompt, response: str, good: bool, template: int) -> JudgeRequest:
    text = templates.render("pointwise_yes_no", _modality(question), template, shows_cot=True,
                            question=q.question_text(question), response=response)
    label = "Yes" if good else "No"
    return JudgeRequest(_judge_prompt(question, text, label, TaskKind.POINTWISE), label,
                        "chosen" if good else "rejected")


def _judge_prompt(question: Prompt, text: str, label: str, kind: TaskKind) -> Prompt:
    """The judge task about `question`: its system turn, its images (in the messages and as ImageRefs, which
    the engines load) and `text`."""
    return Prompt(question.uid, q.task_messages(question, text), label, images=list(question.images), kind=kind)


def judge_requests(item, mode: str, template: int, seed: int) -> list:
    """The judgments an item needs, in a fixed order (seeded per item: reproducible and resumable)."""
    if isinstance(item, JudgmentItem):
        return [JudgeRequest(item.prompt, item.prompt.ground_truth, "task")]
    if mode == "pointwise":
        return [pointwise_request(item.question, r, True, template) for r in item.chosen] + \
               [pointwise_request(item.question, r, False, template) for r in item.rejected]
    out = []
    for ci, c in enumerate(item.chosen):
        for ri, r in enumerate(item.rejected):
            chosen_first = random.Random(f"{seed}/{item.id}/{ci}/{ri}").random() < 0.5
            first, second = (c, r) if chosen_first else (r, c)
            out.append(pairwise_request(item.question, first, second, "A" if chosen_first else "B", template))
    return out


def judgment_outcome(item, requests: list, texts: list, verifier) -> dict:
    """Right/wrong of the whole item, with per-judgment verdicts, the unparsable count and ties."""
    verdicts = verifier.verify_batch([VerifyRequest(t, r.label, r.prompt.kind) for r, t in zip(requests, texts)])
    labels = [choice_label(v.extracted) for v in verdicts]
    allowed = ("Yes", "No") if requests[0].label in ("Yes", "No") else ("A", "B") \
        if isinstance(item, PreferenceItem) else None
    unparsable = sum(1 for lab in labels if lab is None or (allowed and lab not in allowed))
    right = [v.correct for v in verdicts]
    tie = False
    if isinstance(item, PreferenceItem) and requests[0].role != "pair" and not unparsable:
        chosen = {lab for r, lab in zip(requests, labels) if r.role == "chosen"}
        rejected = {lab for r, lab in zip(requests, labels) if r.role == "rejected"}
        tie = bool(chosen & rejected)
    return {"correct": all(right), "judgments": [{"label": r.label, "verdict": lab, "right": ok}
                                                 for r, lab, ok in zip(requests, labels, right)],
            "unparsable": unparsable, "tie": tie}
