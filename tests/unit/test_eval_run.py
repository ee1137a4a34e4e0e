"""The evaluation loop with a scripted generator: self-reflection numbers equal a hand-traced run, an
interrupted run resumes scoring every item exactly once, a changed suite or model is refused unless forced."""
from __future__ import annotations

import json
import re

import pytest

from spark_megatron.eval.evaluate import evaluate
from spark_megatron.eval.generation import Generation
from spark_megatron.eval.output import EvalStateError
from spark_megatron.eval.report import summarize
from spark_megatron.eval.suite import load_suite

pytestmark = pytest.mark.unit

_Q = re.compile(r"What is (\d+) \+ (\d+)\?")


def _text(prompt) -> str:
    content = prompt.messages[-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


class Scripted:
    """Answers 'What is a + b?' by a per-question script: first answer, judge verdicts, retry answers."""

    def __init__(self, script: dict, fail_after: int = 0):
        self.script = {k: {"first": v[0], "judge": list(v[1]), "retry": list(v[2])} for k, v in script.items()}
        self.calls, self.prompts, self.fail_after = 0, [], fail_after

    def __call__(self, prompts):
        self.calls += 1
        if self.fail_after and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        out = []
        for p in prompts:
            t = _text(p)
            key = "+".join(_Q.search(t).groups())
            s = self.script[key]
            if "Answer Yes or No" in t:
                out.append(Generation(f"\\boxed{{{s['judge'].pop(0)}}}", 2))
            elif "This answer is incorrect" in t:
                out.append(Generation(s["retry"].pop(0), 5))
            else:
                out.append(Generation(s["first"], 4))
                self.prompts.append(key)
        return out


def _setup(tmp_path, n: int, batch: int = 2, name: str = "suite.yaml", extra: str = ""):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    rows = [{"id": f"q{i}", "message": json.dumps([{"role": "user", "content": f"What is {i} + 1? Box it."}]),
             "answer": str(i + 1)} for i in range(n)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / name).write_text(f"name: t\nverify_workers: 0\nengine: {{batch_size: {batch}}}\n{extra}"
                                 "datasets:\n  - {name: arith, path: data.jsonl, format: spark, kind: answer}\n")
    return str(model), str(tmp_path / name)


def _right(i):
    return f"so \\boxed{{{i + 1}}}"


def test_self_reflection_numbers_equal_a_hand_traced_run(tmp_path):
    model, suite_path = _setup(tmp_path, 4, batch=4)
    suite = load_suite(suite_path, ["self_reflection.enabled=true"])
    script = {  # question "i+1": (first answer, the judge's verdicts in order, the retries in order)
        "0+1": (_right(0), ["Yes"], []),  # right, accepted: 0 rounds
        "1+1": ("\\boxed{9}", ["No", "Yes"], [_right(1)]),  # wrong, rejected, fixed by the retry: 1 round
        "2+1": (_right(2), ["No", "No"], ["\\boxed{7}", "\\boxed{8}"]),  # right but rejected twice: broken, 2
        "3+1": ("I do not know", ["Yes"], [_right(3)]),  # no answer -> straight to a retry, then accepted: 1
    }
    gen = Scripted(script)
    s = evaluate(model, suite, tmp_path / "out", make_generator=lambda hf: gen, progress=False)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "items.jsonl").read_text().splitlines())}
    # the hand trace
    assert {k: (r["first_correct"], r["correct"], r["rounds"], r["accepted"]) for k, r in rows.items()} == {
        "q0": (True, True, 0, True), "q1": (False, True, 1, True), "q2": (True, False, 2, False),
        "q3": (False, True, 1, True)}
    assert (rows["q2"]["first_extracted"], rows["q2"]["extracted"]) == ("3", "8")
    # tokens: answer 4 + judge 2 per judge call + retry 5 per retry (q2's last retry is not judged: max 2 rounds)
    assert {k: r["tokens"] for k, r in rows.items()} == {"q0": 6, "q1": 4 + 2 + 5 + 2, "q2": 4 + 2 + 5 + 2 + 5,
                                                         "q3": 4 + 5 + 2}
    d = s["datasets"]["arith"]
    assert (d["first_attempt_accuracy"], d["accuracy"], d["mean_rounds"]) == (0.5, 0.75, 1.0)
    assert all(not v["judge"] and not v["retry"] for v in gen.script.values())  # every scripted turn was used
    assert "| model (first attempt) | 50.0 | 50.0 | 50.0 |" in (tmp_path / "out" / "table.md").read_text()


def test_an_interrupted_run_resumes_and_scores_every_item_once(tmp_path):
    model, suite_path = _setup(tmp_path, 7, batch=2)
    script = {f"{i}+1": (_right(i) if i % 3 else "\\boxed{0}", [], []) for i in range(7)}
    suite = load_suite(suite_path)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, suite, tmp_path / "out", make_generator=lambda hf: Scripted(script, fail_after=2),
                 progress=False)
    items = tmp_path / "out" / "items.jsonl"
    before = items.read_text()
    assert len(before.splitlines()) == 4  # two batches of two reached the file before the "kill"
    with open(items, "a") as f:
        f.write('{"dataset": "arith", "id": "q4", "cor')  # a row cut short by a kill mid-write
    second = Scripted(script)
    s = evaluate(model, load_suite(suite_path), tmp_path / "out", make_generator=lambda hf: second, progress=False)
    assert second.prompts == ["4+1", "5+1", "6+1"]  # only what was not scored before
    text = items.read_text()
    assert text.startswith(before)  # earlier rows untouched
    rows = [json.loads(line) for line in text.splitlines()]
    assert sorted(r["id"] for r in rows) == [f"q{i}" for i in range(7)]
    clean = evaluate(model, load_suite(suite_path), tmp_path / "clean", make_generator=lambda hf: Scripted(script),
                     progress=False)
    assert s["datasets"] == clean["datasets"] and s["datasets"]["arith"]["accuracy"] == pytest.approx(4 / 7)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())["datasets"]["arith"]
    assert written.pop("read") == {"records": 7, "usable": 7, "skipped": {}, "skipped_examples": [], "filtered": 0}
    assert written == summarize(rows, load_suite(suite_path))["datasets"]["arith"]  # recomputed from items.jsonl
    # a finished OUT re-summarises without generating anything
    idle = Scripted(script)
    evaluate(model, load_suite(suite_path), tmp_path / "out", make_generator=lambda hf: idle, progress=False)
    assert idle.calls == 0


def test_a_changed_suite_or_model_is_refused_unless_forced(tmp_path):
    model, suite_path = _setup(tmp_path, 3, batch=3)
    script = {f"{i}+1": (_right(i), [], []) for i in range(3)}
    out = tmp_path / "out"
    evaluate(model, load_suite(suite_path), out, make_generator=lambda hf: Scripted(script), progress=False)
    resumed = Scripted(script)  # other resources, same evaluation: continues (nothing left to do here)
    evaluate(model, load_suite(suite_path, ["engine.batch_size=1", "engine.tensor_parallel_size=2",
                                            "engine.data_parallel_size=4", "engine.timeout_s=60"]), out,
             make_generator=lambda hf: resumed, progress=False)
    assert resumed.calls == 0
    with pytest.raises(EvalStateError, match="another suite"):
        evaluate(model, load_suite(suite_path, ["decoding.max_tokens=8"]), out,
                 make_generator=lambda hf: Scripted(script), progress=False)
    with pytest.raises(EvalStateError, match="another suite"):  # --self-reflection is part of what is evaluated
        evaluate(model, load_suite(suite_path, ["self_reflection.enabled=true"]), out,
                 make_generator=lambda hf: Scripted(script), progress=False)
    (tmp_path / "model" / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(EvalStateError, match="another model"):
        evaluate(model, load_suite(suite_path), out, make_generator=lambda hf: Scripted(script), progress=False)
    forced = Scripted(script)
    evaluate(model, load_suite(suite_path), out, force=True, make_generator=lambda hf: forced, progress=False)
    assert forced.prompts == ["0+1", "1+1", "2+1"] and len((out / "items.jsonl").read_text().splitlines()) == 3
    data = tmp_path / "data.jsonl"
    data.write_text(data.read_text().replace('"answer": "3"', '"answer": "4"'))  # the data changed
    with pytest.raises(EvalStateError, match="another suite"):
        evaluate(model, load_suite(suite_path), out, make_generator=lambda hf: Scripted(script), progress=False)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from spark_megatron.launch import cli

    model, suite_path = _setup(tmp_path, 2)
    assert cli.main(["eval", "--model", str(tmp_path / "nope"), "--suite", suite_path, "--output",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and "no such directory" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["eval", "--model", model, "--suite", suite_path, "--output", str(tmp_path / "o"),
                     "datasets.arith.limt=3"]) == 2
    assert "unknown config key 'limt'" in capsys.readouterr().err
    assert cli.main(["eval", "--model", model, "--suite", suite_path, "--output", str(tmp_path / "o"),
                     "engine.engine=hf", "engine.tensor_parallel_size=2"]) == 2
    assert "engine.engine=hf runs one full model per rank" in capsys.readouterr().err


def test_a_torchrun_world_that_does_not_match_the_engines_is_one_line(tmp_path, capsys, monkeypatch):
    from spark_megatron.launch import cli

    model, suite_path = _setup(tmp_path, 2)
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["eval", "--model", model, "--suite", suite_path, "--output", str(tmp_path / "o"),
                     "engine.tensor_parallel_size=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: torchrun started 6 ranks but engine.data_parallel_size 1 x engine.tensor_parallel_size 2"
                   " = 2; set engine.data_parallel_size=3")
    monkeypatch.setenv("RANK", "3")  # every rank refuses before any collective; only rank 0 prints
    assert cli.main(["eval", "--model", model, "--suite", suite_path, "--output", str(tmp_path / "o"),
                     "engine.tensor_parallel_size=4"]) == 2
    assert capsys.readouterr().err == "" and not (tmp_path / "o").exists()
