"""Fault handling below the CLI (issue 13), each case without a model: bad data lines and images, prompt lengths,
fitting recycled tasks to the prompt limit, run-directory ownership, resume fallback, pruning by run, the stop
after bad updates, and metrics that continue a resumed run without duplicate steps. The same faults through
`spark-megatron train` are in tests/e2e/test_faults.py."""
from __future__ import annotations

import json
import sys
import types

import pytest

from spark_megatron.data import BadReason, DataError, load_prompts
from spark_megatron.types import Prompt, Rollout, RolloutGroup, Verdict

pytestmark = pytest.mark.unit
GOOD = {"message": json.dumps([{"role": "user", "content": "What is 1 + 1?"}]), "answer": "2"}


def _image_record(path):
    parts = [{"type": "image", "image": path}, {"type": "text", "text": "How many?"}]
    return {"message": json.dumps([{"role": "user", "content": parts}]), "answer": "3"}


# ---------------------------------------------------------------------------------------------- data
def test_non_utf8_line_is_one_bad_record_named_by_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"message": "caf\xe9", "answer": "1"}\n'
                  + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError) as err:
        load_prompts([str(f)])
    msg = str(err.value)
    assert f"{f}: record 1 (line 2)" in msg and "undecodable_line" in msg and "byte 0xe9" in msg
    out = load_prompts([str(f)], on_bad_record="skip")
    assert len(out.prompts) == 2 and dict(out.report.sources[0].skipped) == {"undecodable_line": 1}
    assert "line 2 is not UTF-8" in out.report.summary()


def test_non_utf8_json_file_is_one_line(tmp_path):
    f = tmp_path / "d.json"
    f.write_bytes(b'[{"message": "\xff", "answer": "1"}]')
    with pytest.raises(DataError, match=r"d.json: not UTF-8 \(byte 0xff at offset 14\)"):
        load_prompts([str(f)])


@pytest.mark.parametrize("content, why", [(b"", "empty file"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "not a readable image"),
                                          (b"GIF89a garbage", "not a readable image"), ("half", "does not decode")],
                         ids=["zero_bytes", "png_header_only", "garbage", "truncated"])
def test_bad_images_are_bad_records(tmp_path, content, why):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (10, 200, 10)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2] if content == "half" else content)
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [_image_record("good.png"), _image_record("bad.png")]) + "\n")
    with pytest.raises(DataError) as err:
        load_prompts([str(f)])
    assert f"{f}: record 1 (line 2): field 'message[0].content[0].image': bad_image" in str(err.value)
    assert why in str(err.value)
    out = load_prompts([str(f)], on_bad_record="skip")
    assert [p.images[0].path for p in out.prompts] == [str(good)]
    assert dict(out.report.sources[0].skipped) == {BadReason.BAD_IMAGE.value: 1}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from spark_megatron.models.tiny_checkpoint import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_prompt_lengths_are_counted_as_the_engine_renders_them(tokenizer):
    from spark_megatron.data import arith_prompts
    from spark_megatron.data.lengths import filter_by_length, prompt_token_counts
    from spark_megatron.rollout.engine import ChatRenderer

    prompts = arith_prompts("synthetic:arith?n=40") + [Prompt("long", [{"role": "user", "content": "9 + " * 300}],
                                                              "1")]
    renderer = ChatRenderer(tokenizer)
    assert prompt_token_counts(tokenizer, prompts) == [len(renderer.render(p).token_ids) for p in prompts]
    limit = max(prompt_token_counts(tokenizer, prompts[:-1]))
    kept = filter_by_length(tokenizer, prompts, limit)
    assert kept.kept == prompts[:-1] and [uid for uid, _ in kept.dropped] == ["long"]
    with pytest.raises(ValueError, match="exceed max_prompt_tokens"):  # what the engine would have done with it
        ChatRenderer(tokenizer, limit).render(prompts[-1])


# ---------------------------------------------------------------------------------------------- fitting
def _group(question: str, responses: list, truth: str) -> RolloutGroup:
    from spark_megatron.verify.extraction import extract_boxed

    p = Prompt("q:0", [{"role": "user", "content": question}], truth)
    g = RolloutGroup(p)
    for text in responses:
        ans = extract_boxed(text)
        g.rollouts.append(Rollout(p, [], [], text, verdict=Verdict(ans, ans == truth, float(ans == truth))))
    return g


def _build(tokenizer, limit, group, **cfg):
    from spark_megatron.config import RecycleConfig
    from spark_megatron.recycle import RecycleBuilder
    from spark_megatron.recycle.fitting import PromptFitter

    rc = RecycleConfig(**{"pointwise_prob_mixed": 0.0, "reflection_full_cot_prob": 1.0, **cfg})
    return RecycleBuilder(rc, seed=3, fitter=PromptFitter(tokenizer, limit)).build([group], step=1)


def test_reflection_cuts_the_quoted_response_keeping_its_end(tokenizer):
    from spark_megatron.data.lengths import prompt_token_counts

    cot = "think step by step " * 60 + "so the result is \\boxed{5}"
    group = _group("What is 2 + 2?", [cot, "\\boxed{4}"], "4")
    full = _build(tokenizer, 100000, group, max_judgment_per_step=0)
    limit = prompt_token_counts(tokenizer, full.samples)[0] - 200
    out = _build(tokenizer, limit, group, max_judgment_per_step=0)
    (task,) = out.samples
    n = prompt_token_counts(tokenizer, [task])[0]
    text = task.messages[-1]["content"]
    assert limit - 10 < n <= limit, "the cut keeps as much of the response as fits"
    assert "[...] " in text and "so the result is \\boxed{5}" in text and "Final answer" not in text
    assert task.ground_truth == "4" and out.stats.fitted == 1 and out.stats.dropped_too_long == 0


def test_an_answer_outside_the_kept_tail_is_restated(tokenizer):
    from spark_megatron.data.lengths import prompt_token_counts

    cot = "\\boxed{5} because " + "I double checked it " * 60
    group = _group("What is 2 + 2?", [cot, "\\boxed{4}"], "4")
    full = prompt_token_counts(tokenizer, _build(tokenizer, 100000, group, max_judgment_per_step=0).samples)[0]
    (task,) = _build(tokenizer, full - 150, group, max_judgment_per_step=0).samples
    assert task.messages[-1]["content"].count("Final answer: 5") == 1
    assert prompt_token_counts(tokenizer, [task])[0] <= full - 150


def test_tasks_that_cannot_fit_are_dropped_and_counted(tokenizer):
    group = _group("What is 2 + 2?", ["long " * 80 + "\\boxed{5}", "\\boxed{4}"], "4")
    out = _build(tokenizer, 20, group, judge_input="cot")  # shorter than any template
    assert out.samples == [] and out.stats.dropped_too_long == 2
    assert out.stats.pairwise == out.stats.pointwise == out.stats.reflection == 0


def test_pairwise_cuts_both_responses(tokenizer):
    from spark_megatron.data.lengths import prompt_token_counts

    group = _group("What is 2 + 2?", ["a " * 80 + "\\boxed{5}", "b " * 80 + "\\boxed{4}"], "4")
    full = prompt_token_counts(tokenizer, _build(tokenizer, 100000, group, judge_input="cot",
                                                 max_reflection_per_step=0).samples)[0]
    out = _build(tokenizer, full - 60, group, judge_input="cot", max_reflection_per_step=0)
    (task,) = out.samples
    text = task.messages[-1]["content"]
    assert text.count("[...] ") == 2 and "\\boxed{5}" in text and "\\boxed{4}" in text and out.stats.fitted == 1


# ---------------------------------------------------------------------------------------------- run dir
def test_a_directory_holding_a_run_is_refused_and_force_removes_only_the_run(tmp_path):
    from spark_megatron.run_dir import RunDirError, check_ownership, claim, read_run_id, remove_run

    out = tmp_path / "run"
    assert check_ownership(out, resume=False, force=False) == []  # new directory
    run_id = claim(out, resume=False)
    (out / "checkpoints" / "step_000001").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "tiny_model").mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"holds a run \(run.json, metrics.jsonl, checkpoints\): pass --resume"):
        check_ownership(out, resume=False, force=False)
    assert check_ownership(out, resume=True, force=False) == []
    assert claim(out, resume=True) == run_id  # a resume continues the same run
    with pytest.raises(RunDirError, match="use one of them"):
        check_ownership(out, resume=True, force=True)
    assert [p.name for p in remove_run(out)] == ["run.json", "metrics.jsonl", "checkpoints"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "tiny_model"]
    assert claim(out, resume=False) != run_id and read_run_id(out) is not None


def _fake_ckpt(root, step, run_id):
    from spark_megatron.checkpoint.megatron_format import CheckpointMeta

    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    extra = {"train_state": {"version": 1, "extra_state": {"step": step, "run_id": run_id}}}
    (d / "spark_meta.json").write_text(CheckpointMeta(family="qwen2", hf_config={}, padded_vocab_size=512,
                                                      dtype="float32", step=step, extra=extra).to_json())
    (d / "complete").write_text(json.dumps({"step": step}))
    return d


def test_pruning_touches_only_the_run_being_written(tmp_path):
    from spark_megatron.checkpoint.train_state import checkpoint_run_id, prune, run_checkpoints

    for step, run in [(1, "old"), (2, "old"), (3, "old"), (1, "new")]:
        _fake_ckpt(tmp_path / run, step, run)
    for d in (tmp_path / "old").iterdir():  # both runs' checkpoints in one directory
        d.rename(tmp_path / "new" / f"{d.name}_old")
    root = tmp_path / "new"
    assert [p.name for p in run_checkpoints(root, "new")] == ["step_000001"]
    removed = prune(root, keep_last=1, belongs=lambda p: checkpoint_run_id(p) == "new")
    assert removed == [] and len(list(root.iterdir())) == 4  # the old run's newer checkpoints are not counted
    _fake_ckpt(root, 2, "new")
    removed = prune(root, keep_last=1, belongs=lambda p: checkpoint_run_id(p) == "new")
    assert [p.name for p in removed] == ["step_000001"]
    assert sorted(p.name for p in root.iterdir()) == ["step_000001_old", "step_000002", "step_000002_old",
                                                      "step_000003_old"]


# ---------------------------------------------------------------------------------------------- resume
class _Actor:
    def __init__(self):
        self.bad_streak, self.bad_updates = 0, {"nonfinite": 0, "zero_grad": 0}
        self.streak_kinds = {"nonfinite": 0, "zero_grad": 0}


def _state(tmp_path, run_id="r1"):
    from spark_megatron.config import RunConfig
    from spark_megatron.run_state import RunState

    state = RunState.__new__(RunState)  # the resume logic alone: no data, no model
    state.cfg = RunConfig(output_dir=str(tmp_path))
    state.roles = types.SimpleNamespace(actor=_Actor(), policy_version=0, reference=None)
    state.queue = types.SimpleNamespace(load_state_dict=lambda s: None)
    state.stream = types.SimpleNamespace(load_state_dict=lambda s: None)
    state.prompts, state.is_driver, state.step, state.resumed = [], True, 0, False
    state.ckpt_root, state.run_id, state._adopt_unmarked, state.last_good = tmp_path / "checkpoints", run_id, False, None
    return state


def test_resume_falls_back_past_a_checkpoint_that_raises_anything(tmp_path, monkeypatch, caplog):
    import random

    from torch.distributed.checkpoint.api import CheckpointException

    from spark_megatron.checkpoint import train_state
    from spark_megatron.models.weights import CheckpointError

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _fake_ckpt(root, step, "r1")
    _fake_ckpt(root, 9, "other-run")
    tried = []

    def load(actor, ckpt, rng=True):
        tried.append(ckpt.name)
        if ckpt.name == "step_000003":  # torch's error derives from BaseException, past `except Exception`
            raise CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (EOFError("Ran out"), None)})
        if ckpt.name == "step_000002":
            raise CheckpointError(f"{ckpt}: cannot load train state (KeyError: 'model')")
        return {"step": 1, "stream": {}, "queue": {}, "policy_version": 7, "py_random": list(random.getstate())}

    monkeypatch.setattr(train_state, "load_train_state", load)
    state = _state(tmp_path)
    assert state._resume() == root / "step_000001"
    assert tried == ["step_000003", "step_000002", "step_000001"]  # newest first; another run's never
    out = [r.getMessage() for r in caplog.records if r.name == "spark_megatron.run_state"]
    assert out[0] == (f"[resume] checkpoint {root / 'step_000003'} does not load (CheckpointException: "
                      "CheckpointException ranks:dict_keys([0])); falling back to: step_000002")
    assert state.step == 1 and state.roles.policy_version == 6  # the first push re-publishes version 7
    assert state.last_good == root / "step_000001"

    monkeypatch.setattr(train_state, "load_train_state", lambda a, c, rng=True: (_ for _ in ()).throw(EOFError()))
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* loads \(step_000003: EOFError: ; "
                                              r"step_000002: EOFError: ; step_000001: EOFError: \)"):
        _state(tmp_path)._resume()


def test_load_failure_reason_reads_the_rank_exception_inside_checkpoint_exception():
    from torch.distributed.checkpoint.api import CheckpointException

    from spark_megatron.checkpoint.train_state import load_failure_reason

    e = CheckpointException("CheckpointException ranks:dict_keys([0])",
                            {0: (EOFError("Ran out of input"), None)})
    assert load_failure_reason(e) == "EOFError: Ran out of input"


def test_stop_message_names_cause_and_last_good_checkpoint(tmp_path):
    from spark_megatron.run_state import TrainingStopped

    state = _state(tmp_path)
    state.cfg.optim.stop_after_bad_updates = 3
    actor = state.roles.actor
    actor.bad_streak, actor.streak_kinds = 2, {"nonfinite": 2, "zero_grad": 0}
    state.check_updates("step 4 (policy update)")  # below the limit: keeps going
    actor.bad_streak, actor.streak_kinds = 3, {"nonfinite": 3, "zero_grad": 0}
    state.last_good = tmp_path / "checkpoints" / "step_000002"
    with pytest.raises(TrainingStopped) as err:
        state.check_updates("step 5 (policy update)")
    assert str(err.value) == (
        "stopped at step 5 (policy update): 3 bad optimizer updates in a row (3 with a non-finite loss, gradient "
        "or input (skipped)); likely cause: the learning rate is too high (optim.lr=5e-07), or the data gives "
        f"non-finite values; last good checkpoint: {state.last_good}")
    state.cfg.optim.stop_after_bad_updates = 0
    state.check_updates("step 6")  # 0 = never stop


# ---------------------------------------------------------------------------------------------- metrics
def test_resumed_metrics_have_no_duplicate_steps(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from spark_megatron.config import LoggingConfig
    from spark_megatron.metrics import MetricsLogger, read_metrics

    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw["id"], kw["resume"])) or types.SimpleNamespace(
            id=kw["id"], log=lambda m, step: calls.append(("log", step)), finish=lambda: None),
        Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = LoggingConfig(wandb_project="p", tensorboard=True)
    first = MetricsLogger(cfg, tmp_path, run_id="abc")
    for step in (1, 2, 3, 4):
        first.log(step, {"x": float(step)})
    first.close()  # killed after step 4; the checkpoint was of step 2
    resumed = MetricsLogger(cfg, tmp_path, resume_from_step=2, run_id="abc")
    for step in (3, 4, 5):
        resumed.log(step, {"x": 10.0 * step})
    resumed.close()
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == \
        [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert calls.count(("init", "abc", "allow")) == 2  # the same wandb run, continued
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3, 4, 5]  # steps it already held are not resent
