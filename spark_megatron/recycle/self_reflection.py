"""Test-time self-reflection: answer, judge the own answer, retry when the judge does not say Yes.

Engine-agnostic: `generate(list of message lists) -> list of texts` is any batched chat generator (vLLM, HF),
ideally greedy. Per prompt: answer -> self-judge (pointwise Yes/No on the extracted answer) -> if not Yes,
"this answer is incorrect, solve again" -> new answer; at most `max_rounds` retries. All prompts still in play
are generated together at each stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from spark_megatron.data import question as q
from spark_megatron.recycle import templates
from spark_megatron.types import Prompt
from spark_megatron.verify.choice import choice_label
from spark_megatron.verify.extraction import extract_boxed

Generate = Callable[[list], list]


@dataclass
class TraceStep:
    stage: str
    """answer | judge | retry"""
    messages: list
    text: str
    extracted: Optional[str]


@dataclass
class SelfReflectionResult:
    final_text: str
    final_answer: Optional[str]
    retries: int = 0
    accepted: bool = False
    """The model's own judge said Yes to the final answer (False if retries ran out)."""
    trace: list = field(default_factory=list)


def _modality(prompt: Prompt) -> str:
    return "image" if q.has_images(prompt) else "text"


def judge_messages(prompt: Prompt, answer: str, template_index: int = 0) -> list:
    """Pointwise Yes/No self-judgment of `answer` (fixed template: inference should be deterministic)."""
    text = templates.render("pointwise_yes_no", _modality(prompt), template_index, shows_cot=False,
                            question=q.question_text(prompt), response=answer)
    return q.task_messages(prompt, text)


def retry_messages(prompt: Prompt, answer: Optional[str]) -> list:
    shown = answer if answer is not None else "(no final answer was given)"
    return q.task_messages(prompt, templates.render_retry(_modality(prompt), q.question_text(prompt), shown))


def _run(generate: Generate, stage: str, indices: list, messages: list, results: list) -> list:
    texts = generate(messages) if messages else []
    if len(texts) != len(messages):
        raise ValueError(f"generate returned {len(texts)} texts for {len(messages)} prompts")
    for i, m, t in zip(indices, messages, texts):
        results[i].trace.append(TraceStep(stage, m, t, extract_boxed(t)))
    return texts


def self_reflect(prompts: Sequence[Prompt], generate: Generate, max_rounds: int = 2, judge_template: int = 0,
                 judge_final: bool = False) -> list:
    """SelfReflectionResult per prompt, in order (final answer, retries used, whether accepted, trace).

    `judge_final` also judges the answer of the last retry (only to report `accepted`; it cannot change it).
    """
    results = [SelfReflectionResult("", None) for _ in prompts]
    active = list(range(len(prompts)))
    for i, text in zip(active, _run(generate, "answer", active, [p.messages for p in prompts], results)):
        results[i].final_text, results[i].final_answer = text, extract_boxed(text)
    for round_index in range(max_rounds + 1):
        last = round_index == max_rounds
        if last and not judge_final:
            break
        # An answer-less response cannot be judged: it goes straight to a retry.
        judged = [i for i in active if results[i].final_answer is not None]
        verdicts = _run(generate, "judge", judged,
                        [judge_messages(prompts[i], results[i].final_answer, judge_template) for i in judged], results)
        for i, v in zip(judged, verdicts):
            results[i].accepted = choice_label(extract_boxed(v)) == "Yes"
        active = [i for i in active if not results[i].accepted]
        if last or not active:
            break
        retried = _run(generate, "retry", active,
                       [retry_messages(prompts[i], results[i].final_answer) for i in active], results)
        for i, text in zip(active, retried):
            results[i].final_text, results[i].final_answer = text, extract_boxed(text)
            results[i].retries += 1
    return results
