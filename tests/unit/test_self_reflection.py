"""Test-time self-reflection with a scripted generator."""
import pytest

from spark_megatron.recycle import self_reflect
from spark_megatron.types import ImageRef, Prompt

pytestmark = pytest.mark.unit


def _prompt(uid, image=False):
    text = "What is 2 + 2? Put the final answer in \\boxed{}."
    if image:
        return Prompt(uid, [{"role": "user", "content": [{"type": "image", "image": "/a.png"},
                                                         {"type": "text", "text": text}]}], "4",
                      images=[ImageRef("/a.png")])
    return Prompt(uid, [{"role": "user", "content": text}], "4")


def _text(messages):
    content = messages[-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


class Scripted:
    """Answers by stage: first answers from `first`, retries from `retries`; judge says Yes iff answer is 4."""

    def __init__(self, first, retries=("4",)):
        self.first, self.retries, self.calls = list(first), list(retries), []

    def __call__(self, batch):
        self.calls.append([_text(m) for m in batch])
        out = []
        for m in batch:
            t = _text(m)
            if "Yes or No" in t:
                out.append("\\boxed{Yes}" if "answer:\n4" in t else "\\boxed{No}")
            elif "This answer is incorrect" in t:
                out.append(f"\\boxed{{{self.retries.pop(0)}}}")
            else:
                out.append(self.first.pop(0))
        return out


def test_accepted_first_answer_needs_no_retry():
    gen = Scripted(["\\boxed{4}"])
    (r,) = self_reflect([_prompt("a")], gen)
    assert (r.final_answer, r.retries, r.accepted) == ("4", 0, True)
    assert [s.stage for s in r.trace] == ["answer", "judge"]


def test_rejected_answer_is_retried_until_yes():
    gen = Scripted(["\\boxed{5}", "\\boxed{4}"], retries=["6", "4"])
    r1, r2 = self_reflect([_prompt("a"), _prompt("b")], gen, max_rounds=3)
    assert (r1.final_answer, r1.retries, r1.accepted) == ("4", 2, True)
    assert [s.stage for s in r1.trace] == ["answer", "judge", "retry", "judge", "retry", "judge"]
    assert (r2.final_answer, r2.retries, r2.accepted) == ("4", 0, True)
    assert "Your previous answer was: 5" in r1.trace[2].messages[-1]["content"]
    assert "Your previous answer was: 6" in r1.trace[4].messages[-1]["content"]
    assert [len(c) for c in gen.calls] == [2, 2, 1, 1, 1, 1]  # one batched call per stage


def test_at_most_max_rounds_and_no_final_judge_by_default():
    gen = Scripted(["\\boxed{5}"], retries=["6", "7", "8"])
    (r,) = self_reflect([_prompt("a")], gen, max_rounds=2)
    assert (r.final_answer, r.retries, r.accepted) == ("7", 2, False)
    assert [s.stage for s in r.trace] == ["answer", "judge", "retry", "judge", "retry"]
    gen = Scripted(["\\boxed{5}"], retries=["6", "7"])
    (r,) = self_reflect([_prompt("a")], gen, max_rounds=2, judge_final=True)
    assert [s.stage for s in r.trace][-1] == "judge" and not r.accepted


def test_missing_answer_goes_straight_to_retry_and_images_travel():
    gen = Scripted(["no idea"], retries=["4"])
    (r,) = self_reflect([_prompt("a", image=True)], gen, max_rounds=1)
    assert [s.stage for s in r.trace] == ["answer", "retry"] and r.final_answer == "4"
    retry_msgs = r.trace[1].messages
    assert retry_msgs[-1]["content"][0] == {"type": "image", "image": "/a.png"}
    assert "no final answer" in retry_msgs[-1]["content"][-1]["text"]


def test_generate_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        self_reflect([_prompt("a")], lambda batch: [])
