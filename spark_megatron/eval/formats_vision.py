"""Converters for the multimodal math benchmarks of the SPARK paper's Table 1, from their published schemas.

Field names follow each benchmark's public dataset card. Multiple-choice answers become option letters the way
each benchmark scores them; where the benchmark's scorer also accepts the option's content (MathVista,
MathVision), the ground truth is "(B) <option text>", which the training verifier accepts as the letter or the
value (and nothing that names another option).
"""
from __future__ import annotations

import re

from spark_megatron.eval.items import AnswerItem
from spark_megatron.eval.records import LETTERS, RecordContext, letter_of, options_block

_IMAGE_TAG = re.compile(r"<image\s*\d*>")
_LETTER_SET = re.compile(r"^[A-J](?:\s*[,;]\s*[A-J])+$")


def _check_letter(ctx: RecordContext, field: str, answer: str, n_options: int = len(LETTERS)) -> str:
    letter = answer.strip().strip("()").upper()
    if len(letter) != 1 or letter not in LETTERS[:n_options]:
        ctx.fail(field, "bad_value",
                 f"multiple-choice answer {answer!r} is not an option letter A-{LETTERS[n_options - 1]}")
    return letter


def _letter_and_text(letter: str, text: str) -> str:
    """"(B) 5": the verifier's ground truth for an option whose content also counts as the answer."""
    return f"({letter}) {text.strip()}"


def mathvista(raw: dict, ctx: RecordContext) -> AnswerItem:
    """AI4Math/MathVista: pid, question, image (path) / decoded_image, choices, question_type (multi_choice |
    free_form), answer_type, unit, precision, answer, query (the benchmark's prompt: hint + question + choices).
    Multiple choice: `answer` is the text of one choice; it maps to that choice's letter ((A) = choices[0], the
    order of MathVista's own query) and MathVista's scorer also accepts the choice text."""
    item_id = ctx.record_id(raw, "pid")
    answer = ctx.text(raw, "answer")
    choices = ctx.get(raw, "choices", (list,), required=False) or []
    query = ctx.text(raw, "query", required=False)
    question = query or ctx.text(raw, "question")
    image = ctx.image(raw, "image", "decoded_image")
    if raw.get("question_type") == "multi_choice" or choices:
        if not choices:
            ctx.fail("choices", "missing_field", "multi_choice question without choices")
        letter = letter_of(choices, answer)
        if letter is None:
            ctx.fail("answer", "bad_value", f"answer {answer!r} is not one of the choices")
        if not query:
            question = f"{question}\n{options_block(choices)}"
        answer = _letter_and_text(letter, str(choices[LETTERS.index(letter)]))
    return AnswerItem(item_id, ctx.prompt(item_id, question, answer, (image,)), subset=raw.get("question_type"))


def mathvision(raw: dict, ctx: RecordContext) -> AnswerItem:
    """MathLLMs/MathVision: id, question (with <image1> tags), options (list; empty for free-form), image (path) /
    decoded_image, answer (the option letter when there are options), solution, level, subject."""
    item_id = ctx.record_id(raw, "id")
    answer = ctx.text(raw, "answer")
    options = [str(o) for o in (ctx.get(raw, "options", (list,), required=False) or [])]
    question = _IMAGE_TAG.sub("", ctx.text(raw, "question")).strip()
    image = ctx.image(raw, "image", "decoded_image")
    if options:
        letter = answer.upper() if len(answer) == 1 else letter_of(options, answer)
        if letter is None or letter not in LETTERS[:len(options)]:
            ctx.fail("answer", "bad_value", f"answer {answer!r} is neither an option letter nor an option's text")
        question = f"{question}\n{options_block(options)}"
        answer = _letter_and_text(letter, options[LETTERS.index(letter)])
    return AnswerItem(item_id, ctx.prompt(item_id, question, answer, (image,)), subset=raw.get("subject"))


def wemath(raw: dict, ctx: RecordContext) -> AnswerItem:
    """We-Math/We-Math: ID, split, knowledge concept, question, option ("A. ...; B. ..."), answer (letter), key,
    question number, knowledge concept description, image_path. Scored on the letter (We-Math's strict rule)."""
    item_id = ctx.record_id(raw, "ID")
    question = ctx.text(raw, "question")
    option = ctx.text(raw, "option", required=False)
    answer = _check_letter(ctx, "answer", ctx.text(raw, "answer"))
    image = ctx.image(raw, "image_path", "image")
    text = f"{question}\n{option}" if option else question
    return AnswerItem(item_id, ctx.prompt(item_id, text, answer, (image,)), subset=raw.get("knowledge concept"))


def mathverse(raw: dict, ctx: RecordContext) -> AnswerItem:
    """AI4Math/MathVerse: sample_index, problem_index, problem_version, question (multiple choice: the choices
    are in the text), image, answer (the letter for multi-choice), question_type (multi-choice | free-form),
    query_wo, query_cot, question_for_eval. The subset is the problem version (e.g. Vision Only)."""
    item_id = ctx.record_id(raw, "sample_index")
    question = ctx.text(raw, "question")
    answer = ctx.text(raw, "answer")
    if raw.get("question_type") == "multi-choice":
        answer = _check_letter(ctx, "answer", answer)
    image = ctx.image(raw, "image", "decoded_image")
    return AnswerItem(item_id, ctx.prompt(item_id, question, answer, (image,)), subset=raw.get("problem_version"))


def dynamath(raw: dict, ctx: RecordContext) -> AnswerItem:
    """DynaMath/DynaMath_Sample: id, question (choices in the text), image (path) / decoded_image, ground_truth
    (the letter when answer_type is 'multiple choice'), answer_type, subject, knowledge_level."""
    item_id = ctx.record_id(raw, "id")
    answer = ctx.text(raw, "ground_truth")
    if raw.get("answer_type") == "multiple choice":
        answer = _check_letter(ctx, "ground_truth", answer)
    image = ctx.image(raw, "image", "decoded_image")
    return AnswerItem(item_id, ctx.prompt(item_id, ctx.text(raw, "question"), answer, (image,)),
                      subset=raw.get("subject"))


def logicvista(raw: dict, ctx: RecordContext) -> AnswerItem:
    """Yijia-Xiao/LogicVista data/dataset.json: an object of records keyed by id, each with imagename (under
    images/), question (the options are in the image or the text), answer ("C", or "A, C" when several options
    are right: scored as a set), reasoning, skill, capability."""
    item_id = ctx.record_id(raw, "id")
    answer = ctx.text(raw, "answer")
    letter_set = bool(_LETTER_SET.match(answer.upper()))
    if letter_set:
        answer = ", ".join(sorted({x.strip() for x in re.split(r"[,;]", answer.upper())}))
    name = ctx.text(raw, "imagename")
    image = ctx.image({"imagename": f"images/{name}", "image": name}, "imagename", "image")
    skill = raw.get("skill")
    subset = skill[0] if isinstance(skill, list) and skill else None
    return AnswerItem(item_id, ctx.prompt(item_id, ctx.text(raw, "question"), answer, (image,)),
                      letter_set=letter_set, subset=subset)


def mmk12(raw: dict, ctx: RecordContext) -> AnswerItem:
    """FanqingM/MMK12: id, subject, question (choices in the text for multiple choice), image, answer (LaTeX,
    often wrapped in $$ ... $$, which is dropped)."""
    item_id = ctx.record_id(raw, "id")
    answer = ctx.text(raw, "answer").strip()
    while len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
        answer = answer[1:-1].strip()
    if not answer:
        ctx.fail("answer", "empty_value", "only $ delimiters")
    image = ctx.image(raw, "image")
    return AnswerItem(item_id, ctx.prompt(item_id, ctx.text(raw, "question"), answer, (image,)),
                      subset=raw.get("subject"))
