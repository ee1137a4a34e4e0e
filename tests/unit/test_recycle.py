"""Recycling rules, templates, question extraction, queue and scheduling."""
import json
import re
import string

import pytest

from spark_megatron.config import RecycleConfig
from spark_megatron.data.question import question_text, task_messages
from spark_megatron.recycle import Phase, RecycleBuilder, RecycleQueue, RecycleScheduler
from spark_megatron.recycle import templates
from spark_megatron.types import ImageRef, Prompt, Rollout, RolloutGroup, TaskKind, Verdict
from spark_megatron.verify import Verifier

pytestmark = pytest.mark.unit

QUESTION = "What is 3 + 4?"


def _prompt(uid="d:0", image=False, gt="7"):
    text = QUESTION + " Put the final answer in \\boxed{}."
    if image:
        content = [{"type": "image", "image": "/data/a.png", "max_pixels": 100}, {"type": "text", "text": text}]
        return Prompt(uid, [{"role": "user", "content": content}], gt, images=[ImageRef("/data/a.png", 100)])
    return Prompt(uid, [{"role": "user", "content": text}], gt)


def _rollout(prompt, answer, correct, timed_out=False):
    text = f"Let me think step {answer!r}. " + (f"\\boxed{{{answer}}}" if answer is not None else "I give up")
    return Rollout(prompt, [], [], text, verdict=Verdict(answer, correct, float(correct), timed_out))


def _group(spec, uid="d:0", image=False):
    """spec: list of answers; '7' is correct, None = no answer, anything else wrong."""
    p = _prompt(uid, image)
    return RolloutGroup(p, [_rollout(p, a, a == "7") for a in spec])


def _build(groups, step=0, seed=0, **cfg):
    return RecycleBuilder(RecycleConfig(**cfg), seed=seed).build(groups, step)


def _kinds(samples):
    return [s.kind for s in samples]


def _user_text(sample):
    content = sample.messages[-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


# --------------------------------------------------------------------------------------------- rules

def test_all_correct_gives_pointwise_yes_and_no_reflection():
    res = _build([_group(["7", "7", "7"])])
    (s,) = res.samples
    assert s.kind == TaskKind.POINTWISE and s.ground_truth == "Yes"
    assert s.uid == "d:0/pointwise" and s.origin_uid == "d:0"
    assert QUESTION in _user_text(s) and "7" in _user_text(s)
    assert res.stats.all_correct == 1 and res.stats.reflection == 0
    (s,) = _build([_group(["7", "7"])], label_style="ab").samples
    assert s.ground_truth == "A"


def test_all_wrong_gives_pointwise_no_on_an_answered_rollout_and_reflection():
    for seed in range(20):
        res = _build([_group([None, "5", None, None])], seed=seed)
        judge, refl = res.samples
        assert judge.kind == TaskKind.POINTWISE and judge.ground_truth == "No"
        assert "5" in _user_text(judge)
        assert refl.kind == TaskKind.REFLECTION and refl.ground_truth == "7" and refl.uid == "d:0/reflection"
    (judge, _) = _build([_group(["5", "6"])], label_style="ab").samples
    assert judge.ground_truth == "B"


def test_all_wrong_without_answers_skips_judgment_but_reflects_on_the_cot():
    for seed in range(10):
        res = _build([_group([None, None])], seed=seed)
        (refl,) = res.samples
        assert refl.kind == TaskKind.REFLECTION and "I give up" in _user_text(refl)
        assert res.stats.no_judgment_no_answer == 1 and res.stats.reflection_cot == 1


def _answer_at(text, letter):
    return re.search(rf"\({letter}\) (\S+)\n", text + "\n").group(1)


def test_mixed_group_statistics_over_many_seeds():
    n = 2000
    groups = [_group(["7", "5", "7", "6"], uid=f"d:{i}") for i in range(n)]
    res = _build(groups, max_judgment_per_step=-1, max_reflection_per_step=-1)
    judges = [s for s in res.samples if s.kind != TaskKind.REFLECTION]
    assert len(judges) == n and res.stats.mixed == n
    pointwise = [s for s in judges if s.kind == TaskKind.POINTWISE]
    pairwise = [s for s in judges if s.kind == TaskKind.PAIRWISE]
    assert abs(len(pointwise) / n - 0.3) < 0.04
    yes = sum(s.ground_truth == "Yes" for s in pointwise)
    assert abs(yes / len(pointwise) - 0.5) < 0.07
    a = sum(s.ground_truth == "A" for s in pairwise)
    assert abs(a / len(pairwise) - 0.5) < 0.05
    for s in pairwise:  # the label always points at the correct answer
        text = _user_text(s)
        if "(A) " in text and "(B) " in text and re.search(r"\(A\) \S+\n", text + "\n"):
            assert _answer_at(text, s.ground_truth) == "7"
            assert _answer_at(text, "B" if s.ground_truth == "A" else "A") in ("5", "6")
    for s in pointwise:
        shown_correct = "7" in _user_text(s).replace(QUESTION, "")
        assert (s.ground_truth == "Yes") == shown_correct
    refl = [s for s in res.samples if s.kind == TaskKind.REFLECTION]
    assert len(refl) == n and abs(res.stats.reflection_cot / n - 0.5) < 0.04


def test_pairwise_label_with_a_fixed_template():
    """Every template places (A) before (B): check the label against the rendered order directly."""
    for seed in range(200):
        res = _build([_group(["7", "5"])], seed=seed, pointwise_prob_mixed=0.0)
        (judge, _) = res.samples
        assert judge.kind == TaskKind.PAIRWISE
        text = _user_text(judge).replace(QUESTION, "")
        pos7, pos5 = text.index("7"), text.index("5")
        assert judge.ground_truth == ("A" if pos7 < pos5 else "B")


def test_mixed_group_whose_wrong_rollouts_lack_answers_falls_back_to_pointwise_yes():
    for seed in range(20):
        (judge, refl) = _build([_group(["7", None])], seed=seed).samples
        assert judge.kind == TaskKind.POINTWISE and judge.ground_truth == "Yes"
        assert "I give up" in _user_text(refl)


def test_timed_out_rollouts_are_excluded():
    p = _prompt()
    g = RolloutGroup(p, [_rollout(p, "7", True), _rollout(p, "9^{9^{9}}", False, timed_out=True)])
    res = _build([g])
    assert _kinds(res.samples) == [TaskKind.POINTWISE] and res.samples[0].ground_truth == "Yes"
    assert res.stats.timed_out_rollouts == 1
    g = RolloutGroup(p, [_rollout(p, "9", False, timed_out=True)])
    assert _build([g]).stats.skipped_unusable == 1


def test_recycled_groups_are_never_recycled_and_disabled_builds_nothing():
    g = _group(["7", "5"])
    g.prompt.kind = TaskKind.POINTWISE
    res = _build([g])
    assert res.samples == [] and res.stats.skipped_recycled == 1
    assert _build([_group(["7", "5"])], enabled=False).samples == []


def test_caps_keep_a_seeded_subset_in_group_order():
    groups = [_group(["5", "6"], uid=f"d:{i}") for i in range(10)]
    res = _build(groups, max_judgment_per_step=3, max_reflection_per_step=2)
    assert sum(k == TaskKind.POINTWISE for k in _kinds(res.samples)) == 3
    assert sum(k == TaskKind.REFLECTION for k in _kinds(res.samples)) == 2
    assert res.stats.dropped_judgment_cap == 7 and res.stats.dropped_reflection_cap == 8
    origins = [int(s.origin_uid.split(":")[1]) for s in res.samples]
    assert origins == sorted(origins)
    assert [s.uid for s in _build(groups, max_judgment_per_step=3, max_reflection_per_step=2).samples] == \
        [s.uid for s in res.samples]
    assert _build(groups, max_judgment_per_step=0, max_reflection_per_step=0).samples == []


def test_sampling_is_reproducible_and_depends_on_seed_and_step():
    groups = [_group(["7", "5", "6", "7"], uid=f"d:{i}") for i in range(30)]

    def run(seed, step):
        return [(s.uid, s.ground_truth, s.messages) for s in _build(groups, step=step, seed=seed).samples]

    assert run(1, 5) == run(1, 5)
    assert run(1, 5) != run(2, 5)
    assert run(1, 5) != run(1, 6)


@pytest.mark.parametrize("mode", ["answer", "cot", "both"])
def test_judge_input_modes(mode):
    (judge, _) = _build([_group(["5", "6"])], judge_input=mode).samples
    text = _user_text(judge)
    assert ("Let me think step" in text) == (mode != "answer")
    assert ("Final answer: " in text) == (mode == "both")
    assert ("solution" in text) == (mode != "answer")


def test_judge_input_mixed_is_half_and_half():
    groups = [_group(["5", "6"], uid=f"d:{i}") for i in range(400)]
    res = _build(groups, judge_input="mixed", max_judgment_per_step=-1)
    cot = sum("Let me think step" in _user_text(s) for s in res.samples if s.kind == TaskKind.POINTWISE)
    assert abs(cot / 400 - 0.5) < 0.08


def test_label_style_both_and_invalid_config():
    groups = [_group(["7"], uid=f"d:{i}") for i in range(200)]
    labels = [s.ground_truth for s in _build(groups, label_style="both", max_judgment_per_step=-1).samples]
    assert set(labels) == {"Yes", "A"} and abs(labels.count("A") / 200 - 0.5) < 0.1
    with pytest.raises(ValueError):
        RecycleBuilder(RecycleConfig(judge_input="everything"))
    with pytest.raises(ValueError):
        RecycleBuilder(RecycleConfig(label_style="true_false"))


def test_images_travel_with_every_sample():
    groups = [_group(["7", "5"], uid=f"d:{i}", image=True) for i in range(20)]
    for s in _build(groups, max_judgment_per_step=-1, max_reflection_per_step=-1).samples:
        content = s.messages[-1]["content"]
        assert content[0] == {"type": "image", "image": "/data/a.png", "max_pixels": 100}
        assert content[-1]["type"] == "text" and s.images == [ImageRef("/data/a.png", 100)]
        assert re.search(r"image|picture|figure", content[-1]["text"])


# --------------------------------------------------------------------------------------------- labels / templates

def test_labels_are_verifiable_by_the_verifier():
    groups = [_group(["7", "5"], uid=f"d:{i}") for i in range(30)] + [_group(["7"], uid="e:0")] + \
        [_group(["5"], uid="e:1")]
    res = _build(groups, max_judgment_per_step=-1, label_style="both")
    v = Verifier()
    other = {"Yes": "No", "No": "Yes", "A": "B", "B": "A", "7": "8"}
    for s in res.samples:
        assert v.verify(f"My verdict: \\boxed{{{s.ground_truth}}}", s.ground_truth, s.kind).correct
        assert not v.verify(f"\\boxed{{{other[s.ground_truth]}}}", s.ground_truth, s.kind).correct


@pytest.mark.parametrize("task", templates.TASKS)
@pytest.mark.parametrize("modality", templates.MODALITIES)
def test_template_sets(task, modality):
    n = templates.template_count(task, modality)
    assert n >= 10
    texts = set()
    for i in range(n):
        for cot in (False, True):
            slots = dict(question="Q?", response="R", response_a="RA", response_b="RB")
            if task == "pairwise":
                del slots["response"]
            else:
                del slots["response_a"], slots["response_b"]
            text = templates.render(task, modality, i, shows_cot=cot, **slots)
            texts.add(text)
            assert "\\boxed{}" in text.strip().splitlines()[-1]
            assert "$" not in text and "Q?" in text
            assert bool(re.search(r"\b(image|picture|figure)\b", text)) == (modality == "image")
    assert len(texts) >= n
    raw = templates.TEMPLATES[(task, modality)]
    assert len(set(raw)) == len(raw)
    for t in raw:  # only the documented slots
        names = {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(t)} - {None}
        assert names <= {"question", "response", "response_a", "response_b", "what", "What", "whats"}


def test_question_extraction_and_messages():
    p = Prompt("d:0", [{"role": "system", "content": "sys"}, {"role": "user", "content": [
        {"type": "image", "image": "/a.png"},
        {"type": "text", "text": "Which shape is red?\nA. circle\nB. square\nPlease reason step by step, and put "
                                 "your final answer within \\boxed{}."}]}], "A", images=[ImageRef("/a.png")])
    assert question_text(p) == "Which shape is red?\nA. circle\nB. square"
    msgs = task_messages(p, "NEW")
    assert msgs[0] == {"role": "system", "content": "sys"}
    assert msgs[1]["content"] == [{"type": "image", "image": "/a.png"}, {"type": "text", "text": "NEW"}]
    assert question_text(_prompt()) == QUESTION
    only = Prompt("d:1", [{"role": "user", "content": "Put the answer in \\boxed{}."}], "1")
    assert question_text(only) == "Put the answer in \\boxed{}."
    assert task_messages(_prompt(), "T") == [{"role": "user", "content": "T"}]


# --------------------------------------------------------------------------------------------- queue

def _samples(n, start=0):
    return [Prompt(f"s:{i}", [{"role": "user", "content": f"q{i}"}], "Yes", kind=TaskKind.POINTWISE,
                   origin_uid=f"o:{i}") for i in range(start, start + n)]


def test_queue_fifo_and_batches():
    q = RecycleQueue()
    q.push(_samples(3))
    q.push(_samples(2, start=3))
    assert len(q) == 5 and q.pop_batch(6) is None and len(q) == 5
    assert [p.uid for p in q.pop_batch(2)] == ["s:0", "s:1"]
    assert [p.uid for p in q.pop(10)] == ["s:2", "s:3", "s:4"]
    assert q.pop(1) == [] and q.pushed == 5 and q.popped == 5


def test_queue_max_size_drops_oldest_and_counts():
    q = RecycleQueue(max_size=3)
    assert q.push(_samples(5)) == 2
    assert [p.uid for p in q.peek()] == ["s:2", "s:3", "s:4"] and q.dropped_overflow == 2


def test_queue_epoch_reset():
    q = RecycleQueue()
    assert q.start_epoch(0) == 0
    q.push(_samples(4))
    assert q.start_epoch(0) == 0 and len(q) == 4
    assert q.start_epoch(1) == 4 and len(q) == 0 and q.discarded_epoch_reset == 4
    assert q.metrics()["recycle_queue/discarded_epoch_reset"] == 4.0


def test_queue_state_round_trip_is_json():
    q = RecycleQueue(max_size=10)
    q.start_epoch(2)
    p = _prompt(image=True)
    q.push(_samples(2) + [Prompt("r", task_messages(p, "T"), "7", images=list(p.images),
                                 kind=TaskKind.REFLECTION, origin_uid="d:0")])
    q.pop(1)
    state = json.loads(json.dumps(q.state_dict()))
    q2 = RecycleQueue(max_size=10)
    q2.load_state_dict(state)
    assert q2.peek() == q.peek() and q2.epoch == 2 and q2.max_size == 10
    assert (q2.pushed, q2.popped) == (3, 1)
    assert q2.peek()[-1].kind == TaskKind.REFLECTION and q2.peek()[-1].images == [ImageRef("/data/a.png", 100)]
    assert q2.start_epoch(2) == 0
    q3 = RecycleQueue(max_size=1)  # a smaller configured bound applies to the restored queue (counted)
    q3.load_state_dict(state)
    assert [p.uid for p in q3.peek()] == ["r"] and q3.dropped_overflow == 1


# --------------------------------------------------------------------------------------------- scheduler

def test_alternate_schedule():
    sched = RecycleScheduler(RecycleConfig(schedule="alternate", max_reward_batches_per_step=2), batch_size=4)
    q = RecycleQueue()
    policy = [_prompt(f"d:{i}") for i in range(4)]
    q.push(_samples(3))
    batch = sched.policy_batch(policy, q)
    assert batch.phase == Phase.POLICY and batch.prompts == policy and len(q) == 3
    assert sched.reward_batches(q) == []  # 3 < 4: waits
    q.push(_samples(6, start=3))
    rb = sched.reward_batches(q)
    assert [b.phase for b in rb] == [Phase.REWARD, Phase.REWARD]
    assert [p.uid for p in rb[0].prompts] == ["s:0", "s:1", "s:2", "s:3"] and len(q) == 1
    sched = RecycleScheduler(RecycleConfig(reward_batch_size=2), batch_size=4)
    q.push(_samples(5, start=9))
    assert [len(b.prompts) for b in sched.reward_batches(q)] == [2]


def test_mixed_schedule():
    sched = RecycleScheduler(RecycleConfig(schedule="mixed", mixed_max_per_step=3), batch_size=4)
    q = RecycleQueue()
    q.push(_samples(5))
    policy = [_prompt(f"d:{i}") for i in range(4)]
    batch = sched.policy_batch(policy, q)
    assert batch.prompts[:4] == policy and [p.uid for p in batch.prompts[4:]] == ["s:0", "s:1", "s:2"]
    assert batch.num_recycled == 3 and len(q) == 2
    assert sched.reward_batches(q) == []
    assert RecycleScheduler(RecycleConfig(schedule="mixed"), 4).policy_batch([], q).num_recycled == 2


def test_scheduler_disabled_and_invalid():
    q = RecycleQueue()
    q.push(_samples(8))
    for schedule in ("alternate", "mixed"):
        sched = RecycleScheduler(RecycleConfig(enabled=False, schedule=schedule), batch_size=4)
        assert sched.policy_batch([], q).prompts == [] and sched.reward_batches(q) == []
    with pytest.raises(ValueError):
        RecycleScheduler(RecycleConfig(schedule="interleaved"), 4)
