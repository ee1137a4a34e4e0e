"""Dataset formats of `spark-megatron eval`: the training record format, the SPARK reference's combined
benchmark file, and one converter per public benchmark (schemas from their dataset cards).

A converter turns one raw record into an item or raises BadRecord naming the field; the reader counts and
reports bad records and goes on. Nothing is downloaded: every path is a local file the user points at.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from spark_megatron.data.records import ImageDefaults, RecordError, parse_record
from spark_megatron.eval import formats_reward as reward
from spark_megatron.eval import formats_vision as vision
from spark_megatron.eval.items import AnswerItem, JudgmentItem
from spark_megatron.eval.records import RecordContext
from spark_megatron.types import TaskKind
from spark_megatron.verify.choice import ground_truth_choice


def spark(raw: dict, ctx: RecordContext, kind: str):
    """The training record format {"message": "<JSON chat messages>", "answer": "<ground truth>"} (optional
    "id"), used verbatim: these are the prompts the model was trained on. kind=judgment: the answer is a verdict
    label (Yes/No or an option letter), e.g. recycled judge tasks built from held-out rollouts."""
    try:
        prompt = parse_record(raw, ctx.source, ctx.index, ctx.image_root, ImageDefaults())
    except RecordError as e:
        p = e.problem
        ctx.fail(p.field, p.reason.value, p.detail)
    item_id = ctx.record_id(raw, "id")
    if kind == "answer":
        return AnswerItem(item_id, prompt, subset=raw.get("subset"))
    label = ground_truth_choice(prompt.ground_truth)
    if label is None:
        ctx.fail("answer", "bad_value", f"judgment label {prompt.ground_truth!r} is not Yes/No or an option letter")
    prompt.ground_truth = label
    prompt.kind = TaskKind.POINTWISE if label in ("Yes", "No") else TaskKind.PAIRWISE
    return JudgmentItem(item_id, prompt, subset=raw.get("subset"))


def spark_bench(raw: dict, ctx: RecordContext) -> AnswerItem:
    """internlm/Spark-Data benchmark_combine.json (what the SPARK reference evaluates): dataset (the benchmark's
    name; the item's subset), problem, answer, image_path (None for text questions)."""
    problem = ctx.text(raw, "problem")
    answer = ctx.text(raw, "answer")
    images = (ctx.image(raw, "image_path"),) if raw.get("image_path") else ()
    item_id = ctx.record_id(raw, "id")
    return AnswerItem(item_id, ctx.prompt(item_id, problem, answer, images), subset=raw.get("dataset"))


def math500(raw: dict, ctx: RecordContext) -> AnswerItem:
    """HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id."""
    item_id = ctx.record_id(raw, "unique_id")
    return AnswerItem(item_id, ctx.prompt(item_id, ctx.text(raw, "problem"), ctx.text(raw, "answer")),
                      subset=raw.get("subject"))


def aime(raw: dict, ctx: RecordContext) -> AnswerItem:
    """AIME sets (AI-MO/aimo-validation-aime, HuggingFaceH4/aime_2024): id, problem, solution, answer (an
    integer 0-999), url, year. AIME 2025 copies name the problem 'question'."""
    item_id = ctx.record_id(raw, "id")
    problem = ctx.text(raw, "problem", required="question" not in raw) or ctx.text(raw, "question")
    return AnswerItem(item_id, ctx.prompt(item_id, problem, ctx.text(raw, "answer")), subset=raw.get("year"))


def amc(raw: dict, ctx: RecordContext) -> AnswerItem:
    """AI-MO/aimo-validation-amc: id, problem, answer (stored as a float, 142.0 -> '142'), url."""
    item_id = ctx.record_id(raw, "id")
    return AnswerItem(item_id, ctx.prompt(item_id, ctx.text(raw, "problem"), ctx.text(raw, "answer")))


@dataclass(frozen=True)
class Format:
    name: str
    kinds: tuple
    """Task kinds the format can hold (answer, judgment)."""
    convert: Callable
    """(raw record, RecordContext, kind) -> item."""
    uses_instruction: bool = True
    """Benchmark questions get the suite's instruction appended; records that carry their own do not."""


def _kindless(fn):
    return lambda raw, ctx, kind: fn(raw, ctx)


FORMATS = {f.name: f for f in [
    Format("spark", ("answer", "judgment"), spark, uses_instruction=False),
    Format("spark_bench", ("answer",), _kindless(spark_bench)),
    Format("mathvista", ("answer",), _kindless(vision.mathvista)),
    Format("mathvision", ("answer",), _kindless(vision.mathvision)),
    Format("wemath", ("answer",), _kindless(vision.wemath)),
    Format("mathverse", ("answer",), _kindless(vision.mathverse)),
    Format("dynamath", ("answer",), _kindless(vision.dynamath)),
    Format("logicvista", ("answer",), _kindless(vision.logicvista)),
    Format("mmk12", ("answer",), _kindless(vision.mmk12)),
    Format("math500", ("answer",), _kindless(math500)),
    Format("aime", ("answer",), _kindless(aime)),
    Format("amc", ("answer",), _kindless(amc)),
    Format("rewardbench2", ("judgment",), _kindless(reward.rewardbench2), uses_instruction=False),
    Format("vl_rewardbench", ("judgment",), _kindless(reward.vl_rewardbench), uses_instruction=False),
    Format("preference", ("judgment",), _kindless(reward.preference), uses_instruction=False),
]}
