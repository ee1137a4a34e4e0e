"""Spark-Data readers (JSONL, JSON, HF datasets), bad-record handling, synthetic task, prompt stream."""
import json
import logging

import pytest

from spark_megatron.config import DataConfig
from spark_megatron.data import (BadReason, DataError, PromptStream, arith_prompts, load_from_config, load_prompts,
                                 prompt_from_dict, prompt_to_dict)
from spark_megatron.types import ImageRef, TaskKind

pytestmark = pytest.mark.unit


def _msg(image=None, text="What is shown? Put the final answer in \\boxed{}.", max_pixels=None):
    parts = []
    if image is not None:
        part = {"type": "image", "image": image}
        if max_pixels is not None:
            part["max_pixels"] = max_pixels
        parts.append(part)
    parts.append({"type": "text", "text": text})
    return json.dumps([{"role": "user", "content": parts}])


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 24), (200, 30, 30)).save(tmp_path / "img" / "a.png")  # records' images must decode
    return tmp_path


def _write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_good_jsonl(data_dir):
    f = _write_jsonl(data_dir / "train.jsonl", [
        {"message": _msg("img/a.png", max_pixels=1000), "answer": "3"},
        {"message": json.dumps([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "1+1? Put the final answer in \\boxed{}."}]), "answer": 2},
    ])
    out = load_prompts([f], image_max_pixels=5000, image_min_pixels=10)
    a, b = out.prompts
    assert a.uid == f"{f}:0" and a.ground_truth == "3"
    img_path = str(data_dir / "img" / "a.png")
    assert a.images == [ImageRef(path=img_path, max_pixels=1000, min_pixels=10)]
    assert a.messages[0]["content"][0] == {"type": "image", "image": img_path, "max_pixels": 1000, "min_pixels": 10}
    assert b.ground_truth == "2" and b.images == [] and b.messages[0] == {"role": "system", "content": "Be brief."}
    assert a.kind == TaskKind.POLICY
    assert out.report.loaded == 2 and out.report.skipped == 0


def test_good_json_list_and_config(data_dir):
    f = data_dir / "train.json"
    f.write_text(json.dumps([{"message": _msg(), "answer": "x"}, {"message": _msg("img/a.png"), "answer": "y"}]))
    out = load_from_config(DataConfig(train_files=[str(f), "synthetic:arith?n=3"]))
    assert [p.uid for p in out.prompts] == [f"{f}:0", f"{f}:1", "synthetic:arith:0", "synthetic:arith:1",
                                            "synthetic:arith:2"]
    assert out.prompts[1].images[0].max_pixels == DataConfig().image_max_pixels


BAD = [
    ({"message": "[{not json", "answer": "1"}, "message", BadReason.UNPARSEABLE_MESSAGE),
    ({"message": _msg()}, "answer", BadReason.MISSING_FIELD),
    ({"answer": "1"}, "message", BadReason.MISSING_FIELD),
    ({"message": _msg("img/missing.png"), "answer": "1"}, "message[0].content[0].image", BadReason.MISSING_IMAGE),
    ({"message": _msg(), "answer": ["1"]}, "answer", BadReason.WRONG_TYPE),
    ({"message": 17, "answer": "1"}, "message", BadReason.WRONG_TYPE),
    ({"message": _msg("img/a.png", max_pixels="big"), "answer": "1"}, "message[0].content[0].max_pixels",
     BadReason.WRONG_TYPE),
    ({"message": _msg(), "answer": "  "}, "answer", BadReason.EMPTY_ANSWER),
    ({"message": json.dumps([{"role": "user", "content": [{"type": "video"}]}]), "answer": "1"},
     "message[0].content[0]", BadReason.UNPARSEABLE_MESSAGE),
    ({"message": json.dumps({"role": "user"}), "answer": "1"}, "message", BadReason.UNPARSEABLE_MESSAGE),
    ("{broken json line", "<record>", BadReason.UNPARSEABLE_RECORD),
    ([1, 2], "<record>", BadReason.UNPARSEABLE_RECORD),
]


@pytest.mark.parametrize("record, field, reason", BAD, ids=[b[2].value + ":" + b[1] for b in BAD])
def test_fail_fast_names_file_index_field(data_dir, record, field, reason):
    f = _write_jsonl(data_dir / "d.jsonl", [{"message": _msg(), "answer": "ok"}, record])
    with pytest.raises(DataError) as err:
        load_prompts([f])
    msg = str(err.value)
    assert f in msg and "record 1" in msg and f"field '{field}'" in msg and reason.value in msg
    assert err.value.problem.index == 1 and err.value.problem.reason == reason


def test_skip_mode_counts_per_reason(data_dir, caplog):
    records = [{"message": _msg(), "answer": "ok"}] + [b[0] for b in BAD] + [{"message": _msg(), "answer": "ok2"}]
    f = _write_jsonl(data_dir / "d.jsonl", records)
    with caplog.at_level(logging.WARNING):
        out = load_prompts([f], on_bad_record="skip")
    assert [p.ground_truth for p in out.prompts] == ["ok", "ok2"]
    assert [p.uid for p in out.prompts] == [f"{f}:0", f"{f}:{len(records) - 1}"]
    src = out.report.sources[0]
    assert src.total == len(records) and src.loaded == 2
    assert dict(src.skipped) == {"unparseable_message": 3, "missing_field": 2, "missing_image": 1, "wrong_type": 3,
                                 "empty_answer": 1, "unparseable_record": 2}
    assert len(src.examples) == 5 and "record 1" in src.examples[0]
    assert "skipped 12 bad records" in caplog.text and "missing_image=1" in out.report.summary()


def test_all_bad_in_skip_mode_is_an_error(data_dir):
    f = _write_jsonl(data_dir / "d.jsonl", [{"answer": "1"}])
    with pytest.raises(DataError, match="no usable records"):
        load_prompts([f], on_bad_record="skip")


@pytest.mark.parametrize("content, name, match", [
    ('{"message": "x"}', "d.json", "must hold a list"),
    ("[1,", "d.json", "not valid JSON"),
    ("a,b", "d.txt", "unknown data format"),
])
def test_file_level_errors(tmp_path, content, name, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        load_prompts([str(tmp_path / name)])


def test_missing_file_and_bad_mode(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_prompts([str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataError, match="on_bad_record"):
        load_prompts(["synthetic:arith"], on_bad_record="ignore")
    with pytest.raises(DataError, match="empty"):
        load_prompts([])


def test_hf_saved_dir_and_parquet(data_dir):
    datasets = pytest.importorskip("datasets")
    rows = [{"message": _msg("img/a.png"), "answer": "3"}, {"message": _msg(), "answer": "4"}]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(data_dir / "hfdir"))
    (data_dir / "hfdir" / "img").mkdir()
    (data_dir / "hfdir" / "img" / "a.png").write_bytes((data_dir / "img" / "a.png").read_bytes())
    out = load_prompts([f"hf:{data_dir / 'hfdir'}"])
    assert [p.ground_truth for p in out.prompts] == ["3", "4"]
    assert out.prompts[0].images[0].path == str(data_dir / "hfdir" / "img" / "a.png")
    datasets.DatasetDict({"train": ds}).save_to_disk(str(data_dir / "dd"))
    with pytest.raises(DataError, match="no split 'test'"):
        load_prompts([f"hf:{data_dir / 'dd'}#test"], check_images=False)
    ds.to_parquet(str(data_dir / "t.parquet"))
    out = load_prompts([str(data_dir / "t.parquet")])
    assert [p.uid for p in out.prompts] == [f"{data_dir / 't.parquet'}:0", f"{data_dir / 't.parquet'}:1"]


def test_synthetic_arith_is_seeded_and_correct():
    a = arith_prompts("synthetic:arith?n=200&seed=3")
    assert [(p.messages, p.ground_truth) for p in a] == \
        [(p.messages, p.ground_truth) for p in arith_prompts("synthetic:arith?n=200&seed=3")]
    assert [p.ground_truth for p in a] != [p.ground_truth for p in arith_prompts("synthetic:arith?n=200&seed=4")]
    for p in a:
        text = p.messages[0]["content"]
        assert text.startswith("What is ") and text.endswith("Put the final answer in \\boxed{}.")
        expr = text[len("What is "):text.index("?")]
        x, op, y = expr.split()
        assert 0 <= int(x) <= 9 and 0 <= int(y) <= 9 and op in "+-"
        assert int(p.ground_truth) == eval(expr) >= 0
    assert arith_prompts("synthetic:arith?n=1&seed=0")[0].messages[0]["content"] == \
        "What is 6 - 0? Put the final answer in \\boxed{}."
    ops = {p.messages[0]["content"].split()[3] for p in arith_prompts("synthetic:arith?n=50&ops=*&max=3")}
    assert ops == {"*"}
    for bad in ("synthetic:arith?n=0", "synthetic:arith?foo=1", "synthetic:arith?ops=/", "synthetic:arith?n=x"):
        with pytest.raises(DataError):
            arith_prompts(bad)


def test_prompt_stream_epochs_and_resume():
    prompts = arith_prompts("synthetic:arith?n=10")
    s = PromptStream(prompts, batch_size=4, seed=1, epochs=2)
    batches = list(s)
    assert [(b.epoch, len(b.prompts)) for b in batches] == [(0, 4), (0, 4), (0, 2), (1, 4), (1, 4), (1, 2)]
    epoch0 = [p.uid for b in batches[:3] for p in b.prompts]
    assert sorted(epoch0) == sorted(p.uid for p in prompts) and epoch0 != [p.uid for p in prompts]
    s2 = PromptStream(prompts, batch_size=4, seed=1, epochs=2)
    s2.next_batch(), s2.next_batch(), s2.next_batch(), s2.next_batch()
    s3 = PromptStream(prompts, batch_size=4, seed=1, epochs=2)
    s3.load_state_dict(json.loads(json.dumps(s2.state_dict())))
    assert [p.uid for p in s3.next_batch().prompts] == [p.uid for p in batches[4].prompts]
    dl = PromptStream(prompts, batch_size=4, seed=1, epochs=1, drop_last=True)
    assert [len(b.prompts) for b in dl] == [4, 4]
    ordered = PromptStream(prompts, batch_size=10, shuffle=False, epochs=1)
    assert [p.uid for p in ordered.next_batch().prompts] == [p.uid for p in prompts]


def test_prompt_serialization_round_trip(data_dir):
    f = _write_jsonl(data_dir / "d.jsonl", [{"message": _msg("img/a.png", max_pixels=99), "answer": "3"}])
    p = load_prompts([f]).prompts[0]
    d = json.loads(json.dumps(prompt_to_dict(p)))
    assert prompt_from_dict(d) == p


def _squares_seen(path) -> int:
    """Independent count: non-white pixels at the centres of the 3x3 grid cells the generator draws into."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    cell = img.width // 3
    side = max(4, cell * 2 // 3)
    return sum(img.getpixel(((c % 3) * cell + 2 + side // 2, (c // 3) * cell + 2 + side // 2)) != (255, 255, 255)
               for c in range(9))


def test_synthetic_shapes_images_match_their_answers_and_are_seeded(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARK_SYNTHETIC_DIR", str(tmp_path / "a"))
    first = load_prompts(["synthetic:shapes?n=24&max=5&seed=3"]).prompts
    assert len(first) == 24 and {p.ground_truth for p in first} == {"1", "2", "3", "4", "5"}
    for p in first:
        assert len(p.images) == 1 and p.messages[0]["content"][0] == {"type": "image", "image": p.images[0].path}
        assert _squares_seen(p.images[0].path) == int(p.ground_truth)
        assert "\\boxed{}" in p.messages[0]["content"][1]["text"]
    monkeypatch.setenv("SPARK_SYNTHETIC_DIR", str(tmp_path / "b"))
    again = load_prompts(["synthetic:shapes?n=24&max=5&seed=3"]).prompts
    assert [p.ground_truth for p in again] == [p.ground_truth for p in first]
    assert all(open(a.images[0].path, "rb").read() == open(b.images[0].path, "rb").read() for a, b in zip(first, again))
    assert [p.ground_truth for p in load_prompts(["synthetic:shapes?n=24&max=5&seed=4"]).prompts] != \
        [p.ground_truth for p in first]


@pytest.mark.parametrize("spec, match", [("synthetic:shapes?colour=red", "unknown option 'colour'"),
                                         ("synthetic:shapes?max=12", "1 <= max <= 9"),
                                         ("synthetic:shapes?n=x", "expects an integer")])
def test_synthetic_shapes_bad_specs(spec, match, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARK_SYNTHETIC_DIR", str(tmp_path))
    with pytest.raises(DataError, match=match):
        load_prompts([spec])


def test_synthetic_arith_keeps_a_literal_plus():
    assert all(" + " in p.messages[0]["content"] for p in arith_prompts("synthetic:arith?n=8&ops=+"))
