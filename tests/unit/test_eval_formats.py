"""Each benchmark converter on a few hand-written rows in that benchmark's published schema (field names from the
dataset cards), including how multiple-choice options become letters, and bad rows named by file/index/field."""
from __future__ import annotations

import io
import json

import pytest

from spark_megatron.eval.items import AnswerItem, JudgmentItem, PreferenceItem
from spark_megatron.eval.reading import load_dataset
from spark_megatron.eval.suite import REFERENCE_INSTRUCTION, DatasetSpec, Suite
from spark_megatron.types import TaskKind

pytestmark = pytest.mark.unit


def _png(path):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    return path


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="PNG")
    return buf.getvalue()


def _load(tmp_path, fmt, rows, kind="answer", name="data.jsonl", **spec_kw):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    suite = Suite()
    spec = DatasetSpec(name="ds", path=str(path), format=fmt, kind=kind, **spec_kw)
    return load_dataset(spec, suite, image_cache=str(tmp_path / "cache"))


def _user_text(item) -> str:
    p = item.question if isinstance(item, PreferenceItem) else item.prompt
    content = p.messages[-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def test_mathvista_multi_choice_maps_the_answer_text_to_its_letter(tmp_path):
    _png(tmp_path / "1.jpg")
    rows = [
        {"pid": "1", "question": "Which is larger?", "image": "1.jpg", "choices": ["3", "5", "7"],
         "unit": None, "precision": None, "answer": "5", "question_type": "multi_choice", "answer_type": "text",
         "metadata": {},
         "query": "Hint: answer with the option.\nQuestion: Which is larger?\nChoices:\n(A) 3\n(B) 5\n(C) 7"},
        {"pid": "2", "question": "How many?", "image": "1.jpg", "choices": None, "unit": None, "precision": None,
         "answer": "4", "question_type": "free_form", "answer_type": "integer", "metadata": {}},
        {"pid": "3", "question": "Pick", "image": "1.jpg", "choices": ["a", "b"], "answer": "c",
         "question_type": "multi_choice"},
    ]
    ld = _load(tmp_path, "mathvista", rows)
    a, b = ld.items
    assert isinstance(a, AnswerItem) and (a.id, a.prompt.ground_truth) == ("1", "(B) 5")  # letter or value
    assert _user_text(a).startswith("Hint: answer with the option.") and _user_text(a).endswith(REFERENCE_INSTRUCTION)
    assert a.prompt.messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert a.prompt.images[0].path == str(tmp_path / "1.jpg")
    assert b.prompt.ground_truth == "4"
    assert ld.report.skipped == {"bad_value": 1}
    assert "record 2 (line 3): field 'answer'" in ld.report.examples[0]
    assert "not one of the choices" in ld.report.examples[0]


def test_mathvision_options_get_letters_and_image_tags_are_dropped(tmp_path):
    """A parquet file as the hub stores it: decoded_image is an HF Image feature (embedded PNG bytes)."""
    import datasets

    rows = {"id": ["7", "8"], "question": ["<image1>\nWhich shape comes next?", "<image1> How long is x?"],
            "options": [["circle", "square"], []], "image": ["images/7.jpg", "images/8.jpg"],
            "decoded_image": [{"bytes": _png_bytes(), "path": None}] * 2, "answer": ["B", "12"],
            "solution": [None, None], "level": [2, 1], "subject": ["logic", "metric"]}
    features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "options": datasets.Sequence(datasets.Value("string")),
                                  "image": datasets.Value("string"), "decoded_image": datasets.Image(),
                                  "answer": datasets.Value("string"), "solution": datasets.Value("string"),
                                  "level": datasets.Value("int64"), "subject": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "test.parquet"))
    spec = DatasetSpec(name="mv", path=str(tmp_path / "test.parquet"), format="mathvision", kind="answer")
    a, b = load_dataset(spec, Suite(), image_cache=str(tmp_path / "cache")).items
    assert (a.prompt.ground_truth, a.subset) == ("(B) square", "logic")
    assert "<image1>" not in _user_text(a) and "(A) circle\n(B) square" in _user_text(a)
    # the embedded image was written once to the content-addressed cache (both rows carry the same bytes)
    assert a.prompt.images[0].path == b.prompt.images[0].path
    assert a.prompt.images[0].path.startswith(str(tmp_path / "cache"))
    assert b.prompt.ground_truth == "12"


def test_wemath_scores_the_letter_and_shows_the_option_line(tmp_path):
    _png(tmp_path / "w.png")
    rows = [{"ID": "3steps_1", "split": "testmini", "knowledge concept": "Angles", "question": "Find angle x.",
             "option": "A. 30°; B. 45°; C. 60°; D. 90°; E. No correct answer", "answer": "C", "key": "2-1",
             "question number": 1, "knowledge concept description": "...", "image_path": "w.png"},
            {"ID": "bad", "question": "q", "option": "A. 1; B. 2", "answer": "60°", "image_path": "w.png"}]
    ld = _load(tmp_path, "wemath", rows)
    (a,) = ld.items
    assert (a.id, a.prompt.ground_truth, a.subset) == ("3steps_1", "C", "Angles")  # the letter only
    assert "Find angle x.\nA. 30°; B. 45°" in _user_text(a)
    assert ld.report.skipped == {"bad_value": 1} and "field 'answer'" in ld.report.examples[0]


def test_mathverse_keeps_choices_in_the_question_and_reports_the_version(tmp_path):
    _png(tmp_path / "v.png")
    rows = [{"sample_index": "12", "problem_index": "3", "problem_version": "Vision Only",
             "question": "Choices:\nA:2\nB:4\nC:8", "image": "v.png", "answer": "B", "question_type": "multi-choice",
             "metadata": {}, "query_wo": "...", "query_cot": "...", "question_for_eval": "..."},
            {"sample_index": "13", "problem_version": "Text Lite", "question": "Find x.", "image": "v.png",
             "answer": "2\\sqrt{3}", "question_type": "free-form"}]
    a, b = _load(tmp_path, "mathverse", rows).items
    assert (a.id, a.prompt.ground_truth, a.subset) == ("12", "B", "Vision Only")
    assert (b.prompt.ground_truth, b.subset) == ("2\\sqrt{3}", "Text Lite")


def test_dynamath_ground_truth_field(tmp_path):
    _png(tmp_path / "d.png")
    rows = [{"id": "1", "question": "Is the function odd?\nChoices:\n(A) yes\n(B) no", "image": "d.png",
             "ground_truth": "A", "answer_type": "multiple choice", "subject": "algebra", "knowledge_level": "hs"},
            {"id": "2", "question": "Area?", "image": "d.png", "ground_truth": "12.5", "answer_type": "float",
             "subject": "geometry"},
            {"id": "3", "question": "?", "image": "missing.png", "ground_truth": "1", "answer_type": "float"}]
    ld = _load(tmp_path, "dynamath", rows)
    assert [(i.prompt.ground_truth, i.subset) for i in ld.items] == [("A", "algebra"), ("12.5", "geometry")]
    assert ld.report.skipped == {"missing_image": 1} and "record 2 (line 3): field 'image'" in ld.report.examples[0]


def test_logicvista_object_of_records_and_letter_sets(tmp_path):
    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "v1_0.png")
    _png(tmp_path / "images" / "v1_1.png")
    data = {"v1_0": {"imagename": "v1_0.png", "question": "Which choice fits?", "answer": "C",
                     "reasoning": "...", "skill": ["inductive"], "capability": ["diagram"]},
            "v1_1": {"imagename": "v1_1.png", "question": "Which belong to green?", "answer": "C, A",
                     "reasoning": "...", "skill": ["inductive"], "capability": ["diagram"]}}
    a, b = _load(tmp_path, "logicvista", data, name="dataset.json").items
    assert (a.id, a.prompt.ground_truth, a.letter_set, a.subset) == ("v1_0", "C", False, "inductive")
    assert (b.id, b.prompt.ground_truth, b.letter_set) == ("v1_1", "A, C", True)
    assert b.prompt.images[0].path == str(tmp_path / "images" / "v1_1.png")


def test_an_image_that_does_not_decode_is_a_bad_record(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [{"id": "1", "question": "?", "image": "ok.png", "ground_truth": "1"},
            {"id": "2", "question": "?", "image": "broken.png", "ground_truth": "1"}]
    ld = _load(tmp_path, "dynamath", rows)
    assert [i.id for i in ld.items] == ["1"] and ld.report.skipped == {"bad_image": 1}
    assert "record 1 (line 2): field 'image': bad_image" in ld.report.examples[0]


def test_mmk12_drops_dollar_delimiters(tmp_path):
    _png(tmp_path / "m.png")
    rows = [{"id": "abb5", "subject": "math", "question": "As shown, find the angle.", "image": "m.png",
             "answer": "$$35^{\\circ}$$"}]
    (a,) = _load(tmp_path, "mmk12", rows).items
    assert (a.prompt.ground_truth, a.subset) == ("35^{\\circ}", "math")


def test_text_benchmarks_math500_aime_amc(tmp_path):
    m = _load(tmp_path, "math500", [{"problem": "Compute $1+1$.", "solution": "2", "answer": "2",
                                     "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}],
              name="m.jsonl").items[0]
    assert (m.id, m.prompt.ground_truth, m.subset, m.prompt.images) == ("test/algebra/1.json", "2", "Algebra", [])
    assert m.prompt.messages[-1] == {"role": "user", "content": "Compute $1+1$.\n" + REFERENCE_INSTRUCTION}
    a = _load(tmp_path, "aime", [{"id": 60, "problem": "Find N.", "solution": "...", "answer": 204,
                                  "url": "u", "year": 2024}], name="a.jsonl").items[0]
    assert (a.id, a.prompt.ground_truth) == ("60", "204")
    c = _load(tmp_path, "amc", [{"id": 0, "problem": "What is x?", "answer": 142.0, "url": "u"},
                                {"id": 1, "problem": "y?", "answer": 0.5, "url": "u"}], name="c.jsonl").items
    assert [i.prompt.ground_truth for i in c] == ["142", "0.5"]


def test_spark_training_records_verbatim_and_judgment_labels(tmp_path):
    msg = json.dumps([{"role": "user", "content": "What is 2 + 3? Put the final answer in \\boxed{}."}])
    (a,) = _load(tmp_path, "spark", [{"message": msg, "answer": "5"}], name="p.jsonl").items
    assert a.prompt.messages == json.loads(msg) and a.prompt.ground_truth == "5"  # no system turn, no suffix
    judge = [{"message": msg, "answer": "Yes"}, {"message": msg, "answer": "(B)"}, {"message": msg, "answer": "7"},
             "{not json"]
    ld = _load(tmp_path, "spark", judge, kind="judgment", name="j.jsonl")
    x, y = ld.items
    assert isinstance(x, JudgmentItem) and (x.prompt.ground_truth, x.prompt.kind) == ("Yes", TaskKind.POINTWISE)
    assert (y.prompt.ground_truth, y.prompt.kind) == ("B", TaskKind.PAIRWISE)
    assert ld.report.skipped == {"bad_value": 1, "unparseable_record": 1}
    assert any("record 3 (line 4): field '<record>'" in e for e in ld.report.examples)


def test_spark_bench_reference_combined_file(tmp_path):
    _png(tmp_path / "x.png")
    rows = [{"dataset": "MathVista", "problem": "How many?", "answer": 3, "image_path": "x.png"},
            {"dataset": "MATH-500", "problem": "1+1?", "answer": "2", "image_path": None}]
    a, b = _load(tmp_path, "spark_bench", rows, name="bench.json", subset=None).items
    assert (a.subset, a.prompt.ground_truth, len(a.prompt.images)) == ("MathVista", "3", 1)
    assert (b.subset, b.prompt.images) == ("MATH-500", [])
    only = _load(tmp_path, "spark_bench", rows, name="bench2.json", subset="MATH-500").items
    assert [i.subset for i in only] == ["MATH-500"]


def test_rewardbench2_best_of_4_and_ties_rows(tmp_path):
    rows = [{"id": "r1", "prompt": "Solve 2x=4.", "chosen": ["x = 2"], "rejected": ["x = 3", "x = 1", "x = 4"],
             "num_correct": 1, "num_incorrect": 3, "total_completions": 4, "models": ["m"] * 4, "subset": "Math",
             "additional_metadata": {}},
            {"id": "r2", "prompt": "Name a primary color.", "chosen": ["red", "blue"], "rejected": ["green"],
             "num_correct": 2, "num_incorrect": 1, "total_completions": 3, "subset": "Ties"},
            {"id": "r3", "prompt": "x", "chosen": "only a string", "rejected": [""], "subset": "Focus"}]
    ld = _load(tmp_path, "rewardbench2", rows, kind="judgment")
    a, b = ld.items
    assert isinstance(a, PreferenceItem) and (len(a.chosen), len(a.rejected), a.subset) == (1, 3, "Math")
    assert _user_text(a) == "Solve 2x=4."  # the prompt as is: no answer instruction for a judged question
    assert (b.chosen, b.rejected) == (["red", "blue"], ["green"])
    assert ld.report.skipped == {"wrong_type": 1} and "field 'rejected[0]'" in ld.report.examples[0]


def test_vl_rewardbench_ranking_picks_the_chosen_response(tmp_path):
    _png(tmp_path / "q.png")
    rows = [{"id": "mathverse_12", "query": "What is the area?", "response": ["Area is 6.", "Area is 12."],
             "image": "q.png", "human_ranking": [1, 0], "models": ["a", "b"], "judge": "human", "rationale": "",
             "query_source": "mathverse", "ground_truth": "12"},
            {"id": "RLAIF-V_3", "query": "Describe.", "response": ["A dog.", "A cat."], "image": "q.png",
             "human_ranking": [0, 1]},
            {"id": "wildvision_1", "query": "?", "response": ["x", "y"], "image": "q.png", "human_ranking": [0, 0]}]
    ld = _load(tmp_path, "vl_rewardbench", rows, kind="judgment")
    a, b = ld.items
    assert (a.chosen, a.rejected, a.subset) == (["Area is 12."], ["Area is 6."], "reasoning")
    assert (b.chosen, b.subset) == (["A dog."], "hallucination")
    assert a.question.images[0].path == str(tmp_path / "q.png")
    assert ld.report.skipped == {"bad_value": 1} and "field 'human_ranking'" in ld.report.examples[0]


def test_a_format_cannot_take_the_wrong_kind_and_limits_apply(tmp_path):
    from spark_megatron.config import ConfigError
    from spark_megatron.eval.suite import validate

    with pytest.raises(ConfigError, match="format 'rewardbench2' holds judgment tasks, not kind 'answer'"):
        validate(Suite(datasets=[DatasetSpec("rb", "x", "rewardbench2", "answer")]))
    rows = [{"id": i, "problem": f"{i}?", "answer": i} for i in range(5)]
    assert [i.id for i in _load(tmp_path, "amc", rows, limit=2).items] == ["0", "1"]


def test_generic_preference_rows(tmp_path):
    _png(tmp_path / "p.png")
    rows = [{"prompt": "Which is right?", "chosen": "A is", "rejected": ["B is", "C is"], "image": "p.png",
             "subset": "mine"},
            {"question": "2+2?", "chosen": ["4"], "rejected": "5"},
            {"chosen": "x", "rejected": "y"}]
    ld = _load(tmp_path, "preference", rows, kind="judgment")
    a, b = ld.items
    assert (a.id, a.chosen, a.rejected, a.subset) == ("0", ["A is"], ["B is", "C is"], "mine")
    assert a.question.images[0].path == str(tmp_path / "p.png")
    assert (b.id, _user_text(b), b.question.images) == ("1", "2+2?", [])
    assert ld.report.skipped == {"missing_field": 1} and "record 2 (line 3): field 'question'" in ld.report.examples[0]
