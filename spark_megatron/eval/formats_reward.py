"""Converters for reward benchmarks: a question and responses the benchmark ranks (chosen above rejected).

The model judges them with the training's judge templates (see scoring.py for how N responses are reduced).
"""
from __future__ import annotations

from spark_megatron.eval.items import PreferenceItem
from spark_megatron.eval.records import RecordContext


def _responses(ctx: RecordContext, raw: dict, field: str) -> list:
    value = ctx.get(raw, field, (list, str))
    items = [value] if isinstance(value, str) else value
    if not items:
        ctx.fail(field, "empty_value", "no responses")
    for i, r in enumerate(items):
        if not isinstance(r, str) or not r.strip():
            ctx.fail(f"{field}[{i}]", "wrong_type", "expected a non-empty string response")
    return list(items)


def rewardbench2(raw: dict, ctx: RecordContext) -> PreferenceItem:
    """allenai/reward-bench-2: id, prompt, chosen (list; one response except in Ties), rejected (list; three
    for best-of-4), num_correct, num_incorrect, total_completions, models, subset (Factuality, Precise IF, Math,
    Safety, Focus, Ties), additional_metadata."""
    item_id = ctx.record_id(raw, "id")
    question = ctx.prompt(item_id, ctx.text(raw, "prompt"), "", instruction=False)
    return PreferenceItem(item_id, question, _responses(ctx, raw, "chosen"), _responses(ctx, raw, "rejected"),
                          subset=raw.get("subset"))


VL_RB_CATEGORIES = (("mathverse", "reasoning"), ("mmmu", "reasoning"), ("rlaif", "hallucination"),
                    ("rlhf", "hallucination"), ("povid", "hallucination"), ("wildvision", "general"),
                    ("vlfeedback", "general"))
"""VL-RewardBench's three reported categories by source (query_source, else the id's prefix). The reasoning
category (MathVerse + MMMU-Pro questions) is the benchmark's math subset."""


def vl_rewardbench_category(raw: dict) -> str:
    source = str(raw.get("query_source") or raw.get("id") or "").lower()
    for prefix, category in VL_RB_CATEGORIES:
        if source.startswith(prefix):
            return category
    return "general"


def vl_rewardbench(raw: dict, ctx: RecordContext) -> PreferenceItem:
    """MMInstruction/VL-RewardBench: id, query, response (two responses), image, human_ranking (the rank of each
    response, 0 = preferred), models, judge, rationale, query_source, ground_truth."""
    item_id = ctx.record_id(raw, "id")
    responses = _responses(ctx, raw, "response")
    ranking = ctx.get(raw, "human_ranking", (list,))
    if len(responses) != 2 or len(ranking) != 2 or not all(isinstance(r, (int, float)) for r in ranking):
        ctx.fail("human_ranking", "bad_value", f"expected two responses with two numeric ranks, got "
                                               f"{len(responses)} responses and ranks {ranking!r}")
    if ranking[0] == ranking[1]:
        ctx.fail("human_ranking", "bad_value", f"ranks {ranking!r} prefer neither response")
    best = 0 if ranking[0] < ranking[1] else 1
    image = ctx.image(raw, "image", "image_path")
    question = ctx.prompt(item_id, ctx.text(raw, "query"), "", (image,), instruction=False)
    return PreferenceItem(item_id, question, [responses[best]], [responses[1 - best]],
                          subset=vl_rewardbench_category(raw))


def preference(raw: dict, ctx: RecordContext) -> PreferenceItem:
    """Any preference data of your own: id (optional), prompt (or question), chosen and rejected (a string or a
    list of strings), image (optional path), subset (optional)."""
    item_id = ctx.record_id(raw, "id")
    text = ctx.text(raw, "prompt", required=False) or ctx.text(raw, "question")
    images = (ctx.image(raw, "image"),) if raw.get("image") is not None else ()
    question = ctx.prompt(item_id, text, "", images, instruction=False)
    return PreferenceItem(item_id, question, _responses(ctx, raw, "chosen"), _responses(ctx, raw, "rejected"),
                          subset=raw.get("subset"))
