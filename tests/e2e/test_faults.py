"""Faults probed as a user meets them, through `spark-megatron train` (issue 13): each case asserts the outcome
(refused, skipped and counted, fell back, stopped with the message) and that nothing already written was lost.

One tiny trained run (module fixture) is reused: its data holds an over-long prompt, a non-UTF-8 line and a
record whose image is a zero-byte file, and its prompt limit is low enough that recycled tasks must be fitted.
Configuration and data errors that need no model are in tests/e2e/test_preflight.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1",
       "WANDB_MODE": "offline", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
BASE = ["warmup_sft_steps=2", "rollout.n=4", "data.prompts_per_step=8", "optim.train_batch_size=32",
        "checkpoint.save_interval=1", "checkpoint.keep_last=2", "logging.progress=false", "logging.wandb_project=null"]
MAX_PROMPT = 130
"""Data prompts render to 35 tokens; judgment / reflection tasks to 85-150: some are cut, some dropped."""


def _train(out_dir, *overrides, resume=False, force=False, timeout=900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "spark_megatron.launch.cli", "train", "--config", "configs/tiny_cpu.yaml",
           f"output_dir={out_dir}", *BASE, *overrides] + (["--resume"] if resume else []) + (["--force"] if force else [])
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _rows(run) -> list:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line]


def _snapshot(run) -> dict:
    """relative path -> sha256 of every file under `run` (what 'nothing was lost or changed' compares)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(run).rglob("*")) if p.is_file()}


def _error_line(proc) -> str:
    """The one `error:` line on stderr (and nothing that looks like a traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    from spark_megatron.data import arith_prompts

    d = tmp_path_factory.mktemp("data")
    (d / "empty.png").write_bytes(b"")
    lines = [json.dumps({"message": json.dumps(p.messages), "answer": p.ground_truth}).encode()
             for p in arith_prompts("synthetic:arith?n=16&max=5&seed=4")]
    long = [{"role": "user", "content": "What is " + "1 + " * 120 + "1? Put the final answer in \\boxed{}."}]
    lines.insert(5, json.dumps({"message": json.dumps(long), "answer": "121"}).encode())
    lines.insert(9, b'{"message": "[{\\"role\\": \\"user\\", \\"content\\": \\"caf\xe9\\"}]", "answer": "1"}')
    image = [{"role": "user", "content": [{"type": "image", "image": "empty.png"}, {"type": "text", "text": "?"}]}]
    lines.insert(12, json.dumps({"message": json.dumps(image), "answer": "2"}).encode())
    (d / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return d / "train.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_file):
    run = tmp_path_factory.mktemp("faults") / "run"
    proc = _train(run, "total_steps=2", f"data.train_files=[{data_file}]", "data.on_bad_record=skip",
                  f"rollout.max_prompt_tokens={MAX_PROMPT}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run, proc


def _data_file_arg(data_file) -> list:
    return [f"data.train_files=[{data_file}]", "data.on_bad_record=skip", f"rollout.max_prompt_tokens={MAX_PROMPT}"]


def test_bad_items_are_dropped_or_skipped_and_counted(trained, data_file):
    run, proc = trained
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # 19 records: 16 usable, 1 over-long prompt dropped, 2 bad records skipped
        assert (r["data/prompts"], r["data/dropped_long_prompts"], r["data/skipped_records"]) == (16, 1, 2)
    assert f"{data_file}: record 9 (line 10): field '<record>': undecodable_line: line 10 is not UTF-8" in proc.stderr
    assert f"{data_file}: record 12 (line 13): field 'message[0].content[0].image': bad_image" in proc.stderr
    assert f"1 prompt(s) longer than rollout.max_prompt_tokens={MAX_PROMPT} dropped (longest: {data_file}:5" \
        in proc.stderr
    # recycled tasks were cut to fit (and some, depending on what was sampled, dropped): counted. Which tasks are
    # built depends on the prompt uids, i.e. on this run's data path, so whether one is dropped varies between
    # runs; the drop rule itself is unit-tested (test_fault_handling.py)
    fitted = sum(r["recycle/fitted"] for r in rows)
    assert fitted > 0 and all(r["recycle/dropped_too_long"] >= 0 for r in rows), fitted
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_the_console_has_our_lines_and_the_rank_log_the_rest(trained):
    """A run's console (progress bars off here): the data report, the warm-up line, the step summary and the end;
    vLLM's per-push lines and the known-harmless library warnings went to the rank's log file instead."""
    run, proc = trained
    console = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(console) <= 12, "\n".join(console)
    assert any(line.startswith("[warm-up] 2 supervised steps, final loss") for line in console), console
    assert any(line.startswith("step 2/2 (steps 1-2): policy acc") for line in console), console
    assert f"done: metrics in {run / 'metrics.jsonl'}" in proc.stdout
    noise = [line for line in console if any(word in line for word in (
        "RotaryEmbedding", "Transformer Engine", "Apex", "Reloading", "prefix cache", " INFO ", "wandb"))]
    assert not noise, noise
    log = (run / "logs" / "rank0.log").read_text()
    pushes = _rows(run)[-1]["policy_version"]  # the warmed-up weights, then one per update
    assert log.count("RotaryEmbedding: Failed to load weights") == pushes
    assert "Successfully reset prefix cache" in log and "Transformer Engine and Apex are not installed" in log
    assert "[warm-up] 2 supervised steps" in log


def test_a_directory_holding_a_run_is_refused(trained, data_file):
    run, _ = trained
    before = _snapshot(run)
    proc = _train(run, "total_steps=2", *_data_file_arg(data_file))
    assert proc.returncode == 2
    assert _error_line(proc) == (f"error: output_dir {run} holds a run (run.json, config.yaml, metrics.jsonl, "
                                 "checkpoints, warmup_model, tensorboard, logs): pass --resume to continue it, "
                                 "--force to delete it and start over, or choose another output_dir")
    assert _snapshot(run) == before


def _truncate_newest_data_file(ckpt: Path) -> None:
    shard = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def test_a_damaged_newest_checkpoint_falls_back_and_the_run_continues(trained, data_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    _truncate_newest_data_file(run / "checkpoints" / "step_000002")
    proc = _train(run, "total_steps=3", *_data_file_arg(data_file), resume=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"[resume] checkpoint {run / 'checkpoints' / 'step_000002'} does not load (" in proc.stderr
    assert "falling back to: step_000001" in proc.stderr
    assert f"[resume] continuing after step 1 from {run / 'checkpoints' / 'step_000001'}" in proc.stderr
    rows, first = _rows(run), _rows(trained[0])
    assert [r["step"] for r in rows] == [1, 2, 3]  # the killed run's step 2 was replaced, not duplicated
    assert rows[0] == first[0]  # what was written before the resume point is untouched
    # policy_version counts pushes (one after every update): an uninterrupted run's at every step (not one higher
    # after a resume); step 3's rollouts were sampled by the version step 2 ended with
    assert [r["policy_version"] for r in rows[:2]] == [first[0]["policy_version"], first[1]["policy_version"]]
    third = rows[2]
    assert third["policy/rollout_policy_version"] == first[1]["policy_version"]
    assert third["policy_version"] == first[1]["policy_version"] + 1 + ("reward/pushed_version" in third)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("policy_version")] == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"


def test_no_loadable_checkpoint_is_one_line(trained, data_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    for ckpt in (run / "checkpoints").glob("step_*"):
        _truncate_newest_data_file(ckpt)
    before = _snapshot(run)
    proc = _train(run, "total_steps=3", *_data_file_arg(data_file), resume=True)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert line.startswith(f"error: no checkpoint under {run / 'checkpoints'} can be resumed from: step_000002: ")
    assert "is truncated" in line and "; step_000001: " in line
    assert _snapshot(run) == before


def test_force_starts_over_and_a_diverging_run_stops(trained, data_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    (run / "notes.txt").write_text("not the run's")
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    proc = _train(run, "total_steps=2", *_data_file_arg(data_file), "warmup_sft_steps=3", "optim.lr=1e12",
                  "optim.stop_after_bad_updates=2", force=True)
    assert proc.returncode == 3, proc.stderr[-5000:]
    assert f"--force: removed run.json, config.yaml, metrics.jsonl, checkpoints, warmup_model, tensorboard, logs " \
           f"from {run}" in proc.stderr
    assert _error_line(proc) == (
        "error: stopped at warm-up step 3: 2 bad optimizer updates in a row (2 with a non-finite loss, gradient or "
        "input (skipped)); likely cause: the learning rate is too high (optim.lr=1e+12), or the data gives "
        "non-finite values; last good checkpoint: none (no checkpoint of this run was written before)")
    assert (run / "notes.txt").read_text() == "not the run's" and (run / "tiny_model" / "config.json").is_file()
    assert json.loads((run / "run.json").read_text())["run_id"] != old_id
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert "TrainingStopped" in (run / "logs" / "rank0.log").read_text()  # the traceback went to the rank log


def test_a_collapsed_policy_stops_and_keeps_what_it_wrote(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "total_steps=3", "warmup_sft_steps=3", "optim.lr=1e6", "optim.stop_after_bad_updates=5")
    assert proc.returncode == 3, proc.stderr[-5000:]
    line = _error_line(proc)
    assert line.startswith("error: stopped at step 2 (policy update): 5 bad optimizer updates in a row (5 with an "
                           "exactly zero gradient); likely cause: the policy collapsed (a learning rate too high, "
                           "optim.lr=1e+06, makes its output uniform)"), line
    assert line.endswith("last good checkpoint: none (no checkpoint of this run was written before)")
    (row,) = _rows(run)  # step 1 finished before the stop: its row and its checkpoint stay
    assert row["step"] == 1 and row["policy/zero_grad"] == 1 and row["health/zero_grad_updates"] == 4
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000001"
