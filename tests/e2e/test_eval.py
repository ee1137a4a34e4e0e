"""`spark-megatron eval` on tiny checkpoints with the real engines.

Text: an HF checkpoint served by one vLLM engine, with self-reflection: every response in items.jsonl equals HF
transformers' greedy decoding (the independent oracle), the self-reflection loop replayed on that oracle gives the
same rounds and final answers, and summary.json equals the summary recomputed from items.jsonl. Then the same
weights as a Megatron checkpoint (converted at TP2, exported on the fly at TP1 by rank 0) on two data-parallel
vLLM engines under torchrun (world 2): item for item the same rows, every engine served its share.
VL: a tiny Qwen2.5-VL on the HF engine, SIGKILLed mid-run and resumed on two HF engines (two spawned ranks, other
resources, same evaluation): every item is scored exactly once, the rows written before the kill are kept byte for
byte, and the result equals a direct evaluation of the items.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import tiny_hf_checkpoint

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
MAX_TOKENS = 16


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(out: Path) -> list:
    return [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]


def _same_text(a, b) -> bool:
    """Equal texts, up to a trailing replacement character: vLLM's incremental detokenizer holds back an
    incomplete UTF-8 sequence at the end of a response, HF's decode renders it as U+FFFD (random tiny models emit
    arbitrary bytes)."""
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_text(x, y) for x, y in zip(a, b))
    return a.rstrip("\ufffd") == b.rstrip("\ufffd")


def _check_summary(out: Path, suite_path: str, extra: tuple = ()) -> dict:
    from spark_megatron.eval.report import summarize
    from spark_megatron.eval.suite import load_suite

    written = json.loads((out / "summary.json").read_text())
    recomputed = summarize(_rows(out), load_suite(suite_path, list(extra)))
    for d in written["datasets"].values():
        d.pop("read")
    assert written["datasets"] == recomputed["datasets"] and written["averages"] == recomputed["averages"]
    return written


class HFOracle:
    """Greedy HF transformers generation with the suite's repetition penalty (messages -> text)."""

    def __init__(self, hf_dir):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def __call__(self, batch: list) -> list:
        out = []
        for messages in batch:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.torch.tensor([self.tok(text, add_special_tokens=False)["input_ids"]])
            with self.torch.no_grad():
                gen = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=MAX_TOKENS, repetition_penalty=1.05,
                                          eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
            out.append(self.tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


ENGINES = re.compile(r"^engines: rollout engine 0 \(rank 0\) (\d+) prompts, rollout engine 1 \(rank 1\) (\d+) "
                     r"prompts \((\d+) batches\)$", re.M)


@pytest.mark.vllm
def test_text_on_vllm_matches_the_hf_oracle_and_two_engines_match_one(tmp_path):
    from spark_megatron.checkpoint.hf_import import convert_hf_to_megatron
    from spark_megatron.eval import scoring
    from spark_megatron.eval.reading import load_dataset
    from spark_megatron.eval.suite import load_suite
    from spark_megatron.launch import cli
    from spark_megatron.recycle.self_reflection import self_reflect

    hf = tiny_hf_checkpoint("untied")
    msg = lambda q: json.dumps([{"role": "user", "content": f"{q} Put the final answer in \\boxed{{}}."}])  # noqa
    _jsonl(tmp_path / "arith.jsonl", [{"message": msg(f"What is {a} + {b}?"), "answer": str(a + b)}
                                      for a, b in [(1, 2), (3, 4), (0, 5), (2, 2)]])
    _jsonl(tmp_path / "long.jsonl", [{"message": msg("Count: " + "one two " * 400), "answer": "800"}])
    _jsonl(tmp_path / "prefs.jsonl", [
        {"id": "bo4", "prompt": "What is 6 - 2?", "chosen": "6 - 2 = 4, so \\boxed{4}",
         "rejected": ["\\boxed{3}", "\\boxed{8}", "\\boxed{5}"], "subset": "Math"},
        {"id": "pair", "prompt": "What is 1 + 1?", "chosen": ["\\boxed{2}"], "rejected": ["\\boxed{11}"]}])
    _jsonl(tmp_path / "judge.jsonl", [{"message": msg("Is 2 + 2 = 4 right? Answer Yes or No."), "answer": "Yes"}])
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(f"""name: tiny
decoding: {{max_tokens: {MAX_TOKENS}}}
engine: {{batch_size: 3, max_prompt_tokens: 512}}
datasets:
  - {{name: arith, path: arith.jsonl, format: spark, kind: answer}}
  - {{name: long, path: long.jsonl, format: spark, kind: answer}}
  - {{name: prefs, path: prefs.jsonl, format: preference, kind: judgment}}
  - {{name: judge, path: judge.jsonl, format: spark, kind: judgment}}
""")
    # one engine in this process, on the HF checkpoint
    out = tmp_path / "out"
    assert cli.main(["eval", "--model", str(hf), "--suite", str(suite_path), "--output", str(out),
                     "--self-reflection", "--no-progress"]) == 0
    rows = {(r["dataset"], r["id"]): r for r in _rows(out)}
    assert len(rows) == 4 + 1 + 2 + 1
    written = _check_summary(out, str(suite_path), ("self_reflection.enabled=true",))
    assert set(written["datasets"]) == {"arith", "long", "prefs", "judge"} and written["self_reflection"]
    assert (out / "table.md").read_text().startswith(
        "| Model | arith | long | Avg-M | prefs | judge | Avg-R | Avg-All |")
    assert "max_prompt_tokens 512" in rows[("long", "0")]["error"]  # served as an error, counted wrong

    oracle = HFOracle(hf)
    suite = load_suite(str(suite_path), ["self_reflection.enabled=true"])
    arith = load_dataset(suite.dataset("arith"), suite).items
    replay = self_reflect([it.prompt for it in arith], oracle, max_rounds=2)
    for it, r in zip(arith, replay):
        row = rows[("arith", it.id)]
        assert _same_text(row["first_response"], r.trace[0].text) and _same_text(row["response"], r.final_text)
        assert (row["first_extracted"], row["extracted"], row["rounds"], row["accepted"]) == \
            (r.trace[0].extracted, r.final_answer, r.retries, r.accepted)
    served = sum(len(r.trace) for r in replay)  # generations the engines served (the long prompt never is)
    for name in ("prefs", "judge"):
        for it in load_dataset(suite.dataset(name), suite).items:
            reqs = scoring.judge_requests(it, "pairwise", 0, 0)
            assert _same_text(rows[(name, it.id)]["response"], oracle([r.prompt.messages for r in reqs]))
            served += len(reqs)
    assert len(rows[("prefs", "bo4")]["judgments"]) == 3  # best-of-4: the chosen one against each rejected

    # two vLLM engines (world 2, TP 1) under torchrun, as launch-eval runs them, on the Megatron checkpoint,
    # exported on the fly by rank 0: item for item the same rows, and each engine served its share of every batch
    from spark_megatron.parallel.spawn import free_port

    meg = tmp_path / "meg"
    convert_hf_to_megatron(hf, meg, tp=2, progress=False)
    out2 = tmp_path / "out2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]
    res = subprocess.run(torchrun + _eval_cmd(meg, str(suite_path), out2)[1:] +
                         ["--self-reflection", "engine.data_parallel_size=2"], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert _rows(out2) == _rows(out)
    written2 = _check_summary(out2, str(suite_path), ("self_reflection.enabled=true",))
    assert written2["datasets"] == written["datasets"] and written2["averages"] == written["averages"]
    first, second, batches = map(int, ENGINES.search(res.stdout).groups())
    assert first + second == served and second > 0 and 0 <= first - second <= batches  # engine 0 takes odd ones
    assert not list(out2.glob("spark_eval_hf_*"))  # the export rank 0 served from is gone
    # the console has our lines; vLLM's (engine build, every batch's INFO lines) went to the ranks' log files
    vllm_lines = re.compile(r"\b(?:INFO|WARNING|DEBUG) \d\d-\d\d \d\d:\d\d:\d\d \[")
    console = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert not [line for line in console if vllm_lines.search(line)], console
    logs = [(out2 / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert all(" INFO vllm" in log for log in logs), [log[-500:] for log in logs]


def _vl_data(tmp_path, n: int) -> str:
    from PIL import Image

    rows = []
    for i in range(n):
        Image.new("RGB", (56, 56), (30 * (i % 8), 90, 200 - 20 * (i % 8))).save(tmp_path / f"{i}.png")
        mc = i % 2 == 1
        rows.append({"pid": str(i), "question": f"How many squares are there? ({i})", "image": f"{i}.png",
                     "choices": ["1", "2", "3"] if mc else None, "answer": "2" if mc else str(i % 4),
                     "question_type": "multi_choice" if mc else "free_form", "answer_type": "integer"})
    _jsonl(tmp_path / "mathvista.jsonl", rows)
    _jsonl(tmp_path / "vlrb.jsonl", [{"id": f"mathverse_{i}", "query": "What is the area?", "image": f"{i}.png",
                                      "response": ["It is 6.", "It is 12."], "human_ranking": [i % 2, 1 - i % 2],
                                      "query_source": "mathverse"} for i in range(3)])
    suite = tmp_path / "suite.yaml"
    suite.write_text("""name: tiny-vl
decoding: {max_tokens: 16}
engine: {batch_size: 1}
verify_workers: 0
datasets:
  - {name: MathVista, path: mathvista.jsonl, format: mathvista, kind: answer}
  - {name: VL-RewardBench, path: vlrb.jsonl, format: vl_rewardbench, kind: judgment}
""")
    return str(suite)


def _eval_cmd(model, suite, out) -> list:
    return [sys.executable, "-m", "spark_megatron.launch.eval_entry", "--model", str(model), "--suite", suite,
            "--output", str(out), "--no-progress"]


def test_vl_on_the_hf_engine_survives_a_kill(tmp_path):
    from spark_megatron.eval import scoring
    from spark_megatron.eval.generation import EngineGenerator, build_eval_engine
    from spark_megatron.eval.reading import load_dataset
    from spark_megatron.eval.suite import load_suite

    model = tiny_hf_checkpoint("vl")
    suite_path = _vl_data(tmp_path, 12)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(_eval_cmd(model, suite_path, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    items = out / "items.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if items.is_file() and items.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = items.read_text()
    before = before[:before.rfind("\n") + 1]
    assert 3 <= before.count("\n") < 15
    # resumed on other resources (execution settings are not part of the fingerprint): two HF engines on two
    # spawned ranks, four items per batch split across them
    res = subprocess.run(_eval_cmd(model, suite_path, out) + ["engine.data_parallel_size=2", "engine.batch_size=4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "[resume]" in res.stdout
    first, second, batches = map(int, ENGINES.search(res.stdout).groups())
    assert second > 0 and first + second == 15 - before.count("\n")  # one generation per item left
    text = items.read_text()
    assert text.startswith(before)
    rows = _rows(out)
    keys = [(r["dataset"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 12 + 3
    _check_summary(out, suite_path)

    # the same items evaluated directly (no resume, no output dir) give the same responses
    suite = load_suite(suite_path)
    engine = build_eval_engine(suite.engine, suite.decoding, str(model))
    generate = EngineGenerator(engine, suite.decoding)
    by_key = {(r["dataset"], r["id"]): r for r in rows}
    answers = load_dataset(suite.dataset("MathVista"), suite, str(out / "images")).items
    assert [g.text for g in generate([it.prompt for it in answers])] == \
        [by_key[("MathVista", it.id)]["response"] for it in answers]
    for it in load_dataset(suite.dataset("VL-RewardBench"), suite, str(out / "images")).items:
        reqs = scoring.judge_requests(it, "pairwise", 0, 0)
        assert all(r.prompt.images == it.question.images for r in reqs)  # the image travels with the judgment
        assert [g.text for g in generate([r.prompt for r in reqs])] == by_key[("VL-RewardBench", it.id)]["response"]
