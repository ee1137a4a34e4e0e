"""Vision-SR1 perception reward: the format rule, the follow-up prompts, and the trainer step's rewards against
hand-computed values (reward = (1 - w_f) * accuracy + w_f * format + w_p * perception)."""
from __future__ import annotations

import pytest

from spark_megatron.config import AlgorithmConfig
from spark_megatron.rollout.engine import SamplingSpec
from spark_megatron.types import ImageRef, Prompt, Rollout, RolloutGroup, TaskKind
from spark_megatron.verify import Verifier
from spark_megatron.verify.perception import (FORMAT_INSTRUCTION, PerceptionReward, PerceptionWeights,
                                              extract_description, perception_metrics, perception_prompt,
                                              sr1_format_score, with_format_instruction)

pytestmark = pytest.mark.unit

SR1 = "<description>A bar chart; the red bar is 7.</description> <think>The red bar reads 7.</think> \\boxed{7}"


@pytest.mark.parametrize("text, score", [
    (SR1, 1.0),
    ("  <description>d</description>\n<think>t</think>\n\\boxed{7}\n", 1.0),
    ("< description >d</ description > < think >t< /think > \\boxed{7}", 1.0),  # spaces around < > / ignored
    ("<description></description><think>t</think>\\boxed{7}", 1.0),  # Vision-SR1 allows an empty description
    ("<description>d</description> <think>t</think> \\boxed{7}. Done.", 0.0),  # the box must end the response
    ("<description>d</description> <think>t</think> so \\boxed{7}", 0.0),  # nothing between think and box
    ("Intro. <description>d</description> <think>t</think> \\boxed{7}", 0.0),
    ("<think>t</think> \\boxed{7}", 0.0),
    ("<description>d</description> \\boxed{7}", 0.0),
    ("<description>d</description> <think>t</think> \\box{7}", 0.0),
    ("", 0.0),
])
def test_sr1_format_rule(text, score):
    assert sr1_format_score(text) == score


def test_description():
    assert extract_description(SR1) == "A bar chart; the red bar is 7."
    assert extract_description("<description>  </description>") is None
    assert extract_description("\\boxed{7}") is None


def _vl_prompt(uid="f:0", gt="7", text="How tall is the red bar? Put the final answer in \\boxed{}."):
    return Prompt(uid=uid, ground_truth=gt, images=[ImageRef("/x.png")], messages=[{"role": "user", "content": [
        {"type": "image", "image": "/x.png"}, {"type": "text", "text": text}]}])


def test_format_instruction_and_follow_up_prompt():
    p = _vl_prompt()
    asked = with_format_instruction(p)
    assert asked.messages[0]["content"][-1] == {"type": "text", "text": FORMAT_INSTRUCTION}
    assert p.messages[0]["content"][-1]["text"].startswith("How tall")  # the original is not modified
    assert with_format_instruction(asked) is asked  # already asks for a <description>
    text_prompt = Prompt(uid="t", ground_truth="1", messages=[{"role": "user", "content": "Q?"}])
    assert with_format_instruction(text_prompt).messages[0]["content"] == "Q?\n\n" + FORMAT_INSTRUCTION
    follow = perception_prompt(p, "A bar chart.")
    content = follow.messages[0]["content"]
    assert isinstance(content, str) and "A bar chart." in content and "How tall is the red bar?" in content
    assert "Put the final answer" not in content  # the data's own box instruction is replaced by ours
    assert follow.images == [] and follow.ground_truth == "7" and follow.origin_uid == "f:0"


def test_weights_follow_the_config_keys():
    w = PerceptionWeights.from_config(AlgorithmConfig(format_reward_weight=0.1, perception_reward_weight=1.0))
    assert (w.accuracy, w.format, w.perception) == pytest.approx((0.9, 0.1, 1.0))
    w = PerceptionWeights.from_config(AlgorithmConfig(format_reward_weight=0.2, perception_reward_weight=0.5))
    assert w.total(1.0, 1.0, 1.0) == pytest.approx(0.8 + 0.2 + 0.5)


class ScriptedEngine:
    """Answers a text-only follow-up with \\boxed{7} when its description says 7, else \\boxed{5}."""

    def __init__(self):
        self.calls = []

    def generate(self, requests, sampling):
        self.calls.append((list(requests), sampling))
        return [RolloutGroup(p, [Rollout(p, [], [], "<think>..</think> \\boxed{7}" if "is 7" in p.messages[0]["content"]
                                         else "\\boxed{5}")]) for p in requests]


def _rollouts(prompt, texts):
    return RolloutGroup(prompt, [Rollout(prompt, [1, 2], [3], t) for t in texts])


def test_step_rewards_match_hand_computed_values():
    cfg = AlgorithmConfig(format_reward_weight=0.1, perception_reward_weight=1.0)
    verifier = Verifier(format_reward_weight=cfg.format_reward_weight)
    step = PerceptionReward(cfg, verifier, SamplingSpec(n=4, temperature=1.0, max_tokens=32))
    vl, text = _vl_prompt(), Prompt(uid="t:0", ground_truth="3", messages=[{"role": "user", "content": "1+2?"}])
    judge = Prompt(uid="f:0/pointwise", ground_truth="Yes", images=list(vl.images), kind=TaskKind.POINTWISE,
                   messages=[{"role": "user", "content": "Is 7 right? \\boxed{}"}])
    sampled = step.prompts([vl, text, judge])
    assert sampled[0].messages[0]["content"][-1]["text"] == FORMAT_INSTRUCTION
    assert sampled[1] is text and sampled[2] is judge
    wrong_description = SR1.replace("red bar is 7", "red bar is 9")
    groups = [_rollouts(sampled[0], [SR1,                                   # right, layout, description right
                                     wrong_description,                     # right, layout, description wrong
                                     "The bar is \\boxed{7}",               # right, no layout, no description
                                     SR1.replace("\\boxed{7}", "\\boxed{5}"),  # wrong, layout, description right
                                     "<description>red bar is 7</description> \\boxed{5}"]),  # wrong, no think
              _rollouts(text, ["\\boxed{3}", "3"]), _rollouts(judge, ["\\boxed{Yes}"])]
    for g in groups:
        verdicts = verifier.verify_batch([(r.response_text, g.prompt.ground_truth) for r in g.rollouts])
        for r, v in zip(g.rollouts, verdicts):
            r.verdict = v
    engine = ScriptedEngine()
    step.apply(groups, engine.generate)

    # one batched call: one follow-up per rollout with a description, one sample each, text only
    (requests, sampling), = engine.calls
    assert len(requests) == 4 and sampling.n == 1 and sampling.temperature == 1.0
    assert all(r.images == [] and r.ground_truth == "7" for r in requests)
    assert "red bar is 9" in requests[1].messages[0]["content"]
    want = [0.9 + 0.1 + 1.0, 0.9 + 0.1 + 0.0, 0.9 + 0.0 + 0.0, 0.0 + 0.1 + 1.0, 0.0 + 0.0 + 1.0]
    assert [r.verdict.reward for r in groups[0].rollouts] == pytest.approx(want)
    assert [r.verdict.perception for r in groups[0].rollouts] == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert [r.verdict.format_score for r in groups[0].rollouts] == [1.0, 1.0, 0.0, 1.0, 0.0]
    # text prompts and recycled tasks keep the verifier's reward: 0.9 * accuracy + 0.1 * (boxed answer present)
    assert [r.verdict.reward for r in groups[1].rollouts] == pytest.approx([1.0, 0.0])
    assert groups[2].rollouts[0].verdict.reward == pytest.approx(1.0)
    assert all(r.verdict.perception is None for g in groups[1:] for r in g.rollouts)
    # the group and its rollouts carry the data's prompt again (recycled tasks quote the original question)
    assert groups[0].prompt is vl and all(r.prompt is vl for r in groups[0].rollouts)
    metrics = perception_metrics(groups)
    assert metrics == pytest.approx({"perception/reward": 3 / 5, "perception/format_rate": 3 / 5,
                                     "perception/description_rate": 4 / 5, "perception/total_reward": sum(want) / 5,
                                     "perception/rollouts": 5.0})


def test_off_by_default():
    step = PerceptionReward(AlgorithmConfig(), Verifier(), SamplingSpec())
    vl = _vl_prompt()
    assert not step.enabled and step.prompts([vl])[0] is vl
    group = _rollouts(vl, [SR1])
    group.rollouts[0].verdict = Verifier().verify(SR1, "7")
    engine = ScriptedEngine()
    step.apply([group], engine.generate)
    assert engine.calls == [] and group.rollouts[0].verdict.reward == 1.0 and perception_metrics([group]) == {}
