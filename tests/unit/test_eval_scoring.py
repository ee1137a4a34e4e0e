"""Reward-benchmark rules (pairwise best-of-N reduction, pointwise ties, unparsable verdicts), multiple-choice
allowances, and the summary's macro averages, each against hand-computed outcomes."""
from __future__ import annotations

import pytest

from spark_megatron.eval import scoring
from spark_megatron.eval.items import AnswerItem, JudgmentItem, PreferenceItem
from spark_megatron.eval.report import summarize, table
from spark_megatron.eval.suite import DatasetSpec, Suite
from spark_megatron.recycle import templates
from spark_megatron.types import Prompt, TaskKind
from spark_megatron.verify import Verifier

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=0) as v:
        yield v


def _question(text="Solve 2x = 4."):
    return Prompt("q", [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": text}], "")


def _shown_first(request, a: str, b: str) -> bool:
    text = request.prompt.messages[-1]["content"]
    return text.index(a) < text.index(b)


def test_best_of_4_is_three_seeded_pairwise_comparisons_with_the_training_template(verifier):
    item = PreferenceItem("rb-1", _question(), ["x = 2 [good]"], ["x = 3 [r1]", "x = 1 [r2]", "x = 4 [r3]"])
    reqs = scoring.judge_requests(item, "pairwise", template=0, seed=0)
    assert len(reqs) == 3 and all(r.prompt.kind == TaskKind.PAIRWISE for r in reqs)
    for r, rej in zip(reqs, item.rejected):
        # the label is the position the chosen response was shown in
        assert (r.label == "A") == _shown_first(r, item.chosen[0], rej)
        expected = templates.render("pairwise", "text", 0, shows_cot=True, question="Solve 2x = 4.",
                                    response_a=item.chosen[0] if r.label == "A" else rej,
                                    response_b=rej if r.label == "A" else item.chosen[0])
        assert r.prompt.messages == [item.question.messages[0], {"role": "user", "content": expected}]
    assert [r.label for r in reqs] == [r.label for r in scoring.judge_requests(item, "pairwise", 0, 0)]
    labels = {tuple(r.label for r in scoring.judge_requests(item, "pairwise", 0, s)) for s in range(8)}
    assert len(labels) > 1  # the order really is drawn, not always A

    def judge(picks):  # picks[i]: which response the judge prefers in comparison i ("chosen" / "rejected")
        return [f"I think \\boxed{{{r.label if p == 'chosen' else 'AB'.replace(r.label, '')}}}"
                for r, p in zip(reqs, picks)]

    win = scoring.judgment_outcome(item, reqs, judge(["chosen"] * 3), verifier)
    assert win["correct"] and win["unparsable"] == 0 and [j["right"] for j in win["judgments"]] == [True] * 3
    lose = scoring.judgment_outcome(item, reqs, judge(["chosen", "rejected", "chosen"]), verifier)
    assert not lose["correct"] and lose["unparsable"] == 0
    garbled = scoring.judgment_outcome(item, reqs, judge(["chosen"] * 2) + ["\\boxed{both are fine}"], verifier)
    assert not garbled["correct"] and garbled["unparsable"] == 1 and garbled["judgments"][2]["verdict"] is None
    assert scoring.judgment_outcome(item, reqs, ["no verdict"] * 3, verifier)["unparsable"] == 3


def test_pointwise_mode_needs_yes_for_chosen_and_no_for_rejected_and_counts_ties(verifier):
    item = PreferenceItem("p", _question(), ["good"], ["bad1", "bad2"])
    reqs = scoring.judge_requests(item, "pointwise", template=0, seed=0)
    assert [(r.role, r.label) for r in reqs] == [("chosen", "Yes"), ("rejected", "No"), ("rejected", "No")]
    assert "good" in reqs[0].prompt.messages[-1]["content"] and "Yes or No" in reqs[0].prompt.messages[-1]["content"]
    out = scoring.judgment_outcome(item, reqs, ["\\boxed{Yes}", "\\boxed{No}", "\\boxed{No}"], verifier)
    assert out["correct"] and not out["tie"]
    tie = scoring.judgment_outcome(item, reqs, ["\\boxed{Yes}", "\\boxed{No}", "\\boxed{Yes}"], verifier)
    assert not tie["correct"] and tie["tie"] and tie["unparsable"] == 0
    all_no = scoring.judgment_outcome(item, reqs, ["\\boxed{No}"] * 3, verifier)
    assert not all_no["correct"] and all_no["tie"]
    odd = scoring.judgment_outcome(item, reqs, ["\\boxed{Yes}", "\\boxed{A}", "\\boxed{No}"], verifier)
    assert not odd["correct"] and odd["unparsable"] == 1 and not odd["tie"]


def test_judgments_of_an_image_question_carry_its_image():
    from spark_megatron.types import ImageRef

    question = Prompt("v", [{"role": "user", "content": [{"type": "image", "image": "/d/q.png"},
                                                         {"type": "text", "text": "What is the area?"}]}], "",
                      images=[ImageRef("/d/q.png")])
    item = PreferenceItem("v", question, ["12"], ["6"])
    for mode in ("pairwise", "pointwise"):
        for r in scoring.judge_requests(item, mode, template=0, seed=0):
            assert r.prompt.images == [ImageRef("/d/q.png")]
            assert r.prompt.messages[-1]["content"][0] == {"type": "image", "image": "/d/q.png"}
            assert "image" in r.prompt.messages[-1]["content"][1]["text"].lower()  # the image phrasing


def test_labelled_judgment_records_are_checked_like_recycled_tasks(verifier):
    item = JudgmentItem("j", Prompt("j", [{"role": "user", "content": "Is 5 right?"}], "No", kind=TaskKind.POINTWISE))
    (req,) = scoring.judge_requests(item, "pairwise", 0, 0)
    assert scoring.judgment_outcome(item, [req], ["\\boxed{\\text{No}}"], verifier)["correct"]
    wrong = scoring.judgment_outcome(item, [req], ["\\boxed{Yes}"], verifier)
    assert not wrong["correct"] and wrong["unparsable"] == 0
    assert scoring.judgment_outcome(item, [req], ["no box"], verifier)["unparsable"] == 1


def test_multiple_choice_and_letter_sets(verifier):
    """MathVista/MathVision ground truths "(B) 5" take the letter or the option's value, through the training
    verifier alone; We-Math's "B" takes the letter only; LogicVista's letter sets compare as sets."""
    mc = AnswerItem("1", Prompt("1", [], "(B) 5"))
    for response, ok in [("\\boxed{B}", True), ("\\boxed{(B) 5}", True), ("\\boxed{5}", True), ("\\boxed{5.0}", True),
                         ("\\boxed{C}", False), ("\\boxed{7}", False), ("\\boxed{B} or \\boxed{C}", False),
                         ("no answer", False)]:
        assert scoring.answer_correct(mc, verifier.verify(response, "(B) 5"), response) is ok, response
    strict = AnswerItem("2", Prompt("2", [], "B"))
    assert not scoring.answer_correct(strict, verifier.verify("\\boxed{5}", "B"), "\\boxed{5}")
    sets = AnswerItem("3", Prompt("3", [], "A, C"), letter_set=True)
    for response, ok in [("\\boxed{A, C}", True), ("\\boxed{C, A}", True), ("\\boxed{(C) and (A)}", True),
                         ("\\boxed{A}", False), ("\\boxed{A, B, C}", False), ("\\boxed{C, A} or \\boxed{B}", False),
                         ("none", False)]:
        assert scoring.answer_correct(sets, verifier.verify(response, "A, C"), response) is ok, response
    assert scoring.letter_set("\\text{A,C}") == {"A", "C"} and scoring.letter_set("ACE") == frozenset()


def _row(ds, i, ok, first=None, kind="answer", **kw):
    return {"dataset": ds, "id": str(i), "kind": kind, "correct": ok, "first_correct": ok if first is None else first,
            "tokens": 10, **kw}


def test_summary_macro_averages_and_table_layout():
    suite = Suite(datasets=[DatasetSpec("MathVista", "a", "mathvista", "answer"),
                            DatasetSpec("MathVerse", "b", "mathverse", "answer"),
                            DatasetSpec("VL-RewardBench", "c", "vl_rewardbench", "judgment")])
    suite.self_reflection.enabled = True
    rows = [_row("MathVista", i, i < 3, first=i < 2, extracted="1", rounds=1) for i in range(4)]  # 3/4, 2/4
    rows += [_row("MathVerse", i, i < 1, extracted=None if i == 3 else "2") for i in range(2)]  # 1/2
    rows += [_row("VL-RewardBench", i, i == 0, kind="judgment", unparsable=int(i == 1), tie=False, subset="reasoning")
             for i in range(5)]  # 1/5
    s = summarize(rows, suite)
    ds = s["datasets"]
    assert (ds["MathVista"]["accuracy"], ds["MathVista"]["first_attempt_accuracy"]) == (0.75, 0.5)
    assert ds["VL-RewardBench"]["unparsable_items"] == 1 and ds["VL-RewardBench"]["subsets"]["reasoning"]["n"] == 5
    assert s["averages"] == pytest.approx({"Avg-M": (0.75 + 0.5) / 2, "Avg-R": 0.2, "Avg-All": (0.75 + 0.5 + 0.2) / 3})
    assert s["first_attempt_averages"]["Avg-M"] == pytest.approx((0.5 + 0.5) / 2)
    md = table(s, "SPARK-VL-7B").splitlines()
    assert md[0] == "| Model | MathVista | MathVerse | Avg-M | VL-RewardBench | Avg-R | Avg-All |"
    assert md[2] == "| SPARK-VL-7B (first attempt) | 50.0 | 50.0 | 50.0 | 20.0 | 20.0 | 40.0 |"
    assert md[3] == "| SPARK-VL-7B + self-reflection | 75.0 | 50.0 | 62.5 | 20.0 | 20.0 | 48.3 |"
    with pytest.raises(ValueError, match="more than once"):
        summarize(rows + [rows[0]], suite)

