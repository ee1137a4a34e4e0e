"""The reward cannot be gamed by hedging: a hand-written table of hedged and honest answers, and scripted
"policies" over a few hundred tasks of every kind the trainer grades (numeric and multiple-choice policy tasks,
pointwise Yes/No and A/B judgments and pairwise judgments rendered from the recycle templates). Every hedging
policy must average reward exactly 0; a policy answering correctly, in any accepted form, exactly 1.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import pytest

from spark_megatron.verify import Verifier, is_correct

pytestmark = pytest.mark.unit

# (response, ground truth, correct?) written by hand: the rule in spark_megatron/verify/verifier.py.
HEDGES = [
    (r"\boxed{B, C}", "B", False),
    (r"\boxed{A or B}", "A", False),
    (r"\boxed{A and C}", "A", False),
    (r"\boxed{Yes or No}", "Yes", False),
    (r"\boxed{\text{Yes}/\text{No}}", "No", False),
    (r"\boxed{Yes, No}", "Yes", False),
    (r"\boxed{A/B}", "B", False),
    (r"\boxed{Option B or C}", "C", False),
    (r"\boxed{(A) or (B)}", "A", False),
    (r"\boxed{b or c}", "B", False),
    (r"\boxed{A. 12}", "D. 12", False),          # the right value under the wrong letter names option A
    (r"\boxed{12 or 13}", "D. 12", False),
    (r"\boxed{C} then \boxed{D}", "C", False),    # two different boxed answers
    (r"\boxed{7} or maybe \boxed{8}", "7", False),
    (r"\boxed{8} or maybe \boxed{7}", "7", False),
    (r"\boxed{7 or 8}", "7", False),
    (r"\boxed{7, 8}", "7", False),
    (r"\boxed{}", "7", False),
    (r"\boxed{east or west}", "east", False),
    (r"\boxed{12 + 7}", "19", False),            # the question's computation, not its result
    (r"\boxed{What is 1 * 19?}", "19", False),   # the prompt's own text
    (r"\boxed{\frac{38}{2}}", "19", False),
    # honest answers in every accepted form
    (r"\boxed{B}", "B", True),
    (r"\boxed{(B)}", "B", True),
    (r"\boxed{\text{(B)}}", "B", True),
    (r"\boxed{B. 102}", "B", True),
    (r"\boxed{option b}", "B", True),
    (r"\boxed{Answer: D}", "D", True),
    (r"\boxed{D}", "D. 12", True),
    (r"\boxed{12}", "D. 12", True),
    (r"\boxed{(D) 12}", "D. 12", True),
    (r"\boxed{(C) Point A}", "(C) Point A", True),  # the option's own text is its value, not a second option
    (r"\boxed{\text{Yes}}", "Yes", True),
    (r"\boxed{yes.}", "Yes", True),
    (r"\boxed{No, the sum is wrong}", "No", True),
    (r"\boxed{50\%}", "0.5", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{2.5 \times 10^{3}}", "2500", True),
    (r"\boxed{19 \text{ squares}}", "19", True),
    (r"\boxed{7} and once more \boxed{7}", "7", True),   # the same answer boxed twice
    (r"\boxed{\frac{1}{2}} = \boxed{0.5}", "0.5", True),  # one answer, two forms
    (r"Echoing the instruction \boxed{} first, then \boxed{7}", "7", True),
]


@pytest.mark.parametrize("response, truth, expected", HEDGES)
def test_hedging_table(response, truth, expected):
    assert Verifier().verify(response, truth).correct is expected
    assert is_correct(response, truth) is expected


# ------------------------------------------------------------------------------------------- the tasks

@dataclass
class Task:
    kind: str
    """numeric | choice | yes_no | ab | pairwise"""
    prompt_text: str
    truth: str
    right: str
    """The correct answer (label or number)."""
    wrong: list
    """Wrong candidates the question offers (other options, nearby numbers)."""
    value: Optional[str] = None
    """Choice tasks: the correct option's value."""
    options: list = field(default_factory=list)


def _numeric_tasks(n: int, rng: random.Random) -> list:
    from spark_megatron.data.synthetic import arith_prompts

    out = []
    for p in arith_prompts(f"synthetic:arith?n={n}&max=30&ops=+-*&seed=7"):
        gt = int(p.ground_truth)
        wrong = [str(gt + d) for d in rng.sample([-2, -1, 1, 2, 3, 10], 3)]
        out.append(Task("numeric", p.messages[0]["content"], p.ground_truth, p.ground_truth, wrong))
    return out


def _choice_tasks(n: int, rng: random.Random) -> list:
    out = []
    for i in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        values = [a + b + d for d in rng.sample([-3, -1, 0, 1, 2, 5], 4)]
        if a + b not in values:
            values[rng.randrange(4)] = a + b
        letters = "ABCD"
        right = letters[values.index(a + b)]
        listing = "\n".join(f"({c}) {v}" for c, v in zip(letters, values))
        text = f"What is {a} + {b}?\n{listing}\nPut the letter of the right option in \\boxed{{}}."
        truth = right if i % 2 else f"{right}. {a + b}"  # both ground-truth styles of the data
        out.append(Task("choice", text, truth, right, [c for c in letters if c != right], str(a + b),
                        options=[f"({c}) {v}" for c, v in zip(letters, values)]))
    return out


def _judge_tasks(n: int, style: str) -> list:
    """Pointwise (yes_no / ab) or pairwise tasks, rendered by the RecycleBuilder from verified rollout groups."""
    from spark_megatron.config import RecycleConfig
    from spark_megatron.data.synthetic import arith_prompts
    from spark_megatron.recycle import RecycleBuilder
    from spark_megatron.types import Rollout, RolloutGroup, TaskKind, Verdict

    pairwise = style == "pairwise"
    cfg = RecycleConfig(label_style="ab" if pairwise else style, pointwise_prob_mixed=0.0 if pairwise else 1.0,
                        max_judgment_per_step=-1, judge_input="mixed")
    groups = []
    for k, p in enumerate(arith_prompts(f"synthetic:arith?n={n}&max=20&seed={len(style)}")):
        answers = [p.ground_truth, str(int(p.ground_truth) + 1)]
        if not pairwise and k % 3 == 0:
            answers = answers[:1] * 2  # all correct: a Yes / A label
        rollouts = [Rollout(p, [], [], f"Work... so \\boxed{{{a}}}", verdict=Verdict(a, a == p.ground_truth,
                                                                                  float(a == p.ground_truth)))
                    for a in answers]
        groups.append(RolloutGroup(p, rollouts))
    samples = RecycleBuilder(cfg, seed=11).build(groups, step=0).samples
    kind = TaskKind.PAIRWISE if pairwise else TaskKind.POINTWISE
    labels = ["Yes", "No"] if style == "yes_no" else ["A", "B"]
    out = []
    for s in samples:
        if s.kind is kind:
            out.append(Task(style, s.messages[-1]["content"], s.ground_truth, s.ground_truth,
                            [lab for lab in labels if lab != s.ground_truth], options=labels))
    assert len(out) >= n // 2, (style, len(out))
    return out


def all_tasks() -> list:
    rng = random.Random(0)
    return (_numeric_tasks(80, rng) + _choice_tasks(80, rng) + _judge_tasks(60, "yes_no") + _judge_tasks(60, "ab")
            + _judge_tasks(60, "pairwise"))


@pytest.fixture(scope="module")
def tasks() -> list:
    out = all_tasks()
    assert len(out) >= 300 and {t.kind for t in out} == {"numeric", "choice", "yes_no", "ab", "pairwise"}
    return out


# ------------------------------------------------------------------------------------------- the policies

def _box(x: str) -> str:
    return f"\\boxed{{{x}}}"


def _labels(t: Task) -> list:
    """Every option the task offers (numbers for numeric tasks), the right one first."""
    return [t.right] + list(t.wrong)


HEDGING: dict = {
    "all options listed": lambda t, r: "I cannot decide. " + _box(", ".join(r.sample(_labels(t), len(_labels(t))))),
    "right 'or' wrong": lambda t, r: _box(" or ".join(r.sample([t.right, t.wrong[0]], 2))),
    "right 'and' wrong": lambda t, r: _box(" and ".join(r.sample([t.right, t.wrong[0]], 2))),
    # a slash between numbers is a division, so numeric tasks list their candidates with semicolons instead
    "options with slashes": lambda t, r: _box(("; " if t.kind == "numeric" else "/").join(_labels(t))),
    "the computation, not its result": lambda t, r: _box(_computation(t)),
    "both labels in text": lambda t, r: _box(f"\\text{{{t.right}}} \\text{{ (or {t.wrong[0]})}}"),
    "two boxes, right first": lambda t, r: f"First {_box(t.right)}, on reflection {_box(t.wrong[0])}.",
    "two boxes, wrong first": lambda t, r: f"First {_box(t.wrong[0])}, on reflection {_box(t.right)}.",
    "a box per option": lambda t, r: " ".join(_box(x) for x in r.sample(_labels(t), len(_labels(t)))),
    "an empty box": lambda t, r: "The answer is " + _box(""),
    "the prompt's own text boxed": lambda t, r: _box(t.prompt_text),
    "the prompt's options boxed": lambda t, r: _box(" ".join(t.options) if t.options else " ".join(_labels(t))),
}


def _computation(t: Task) -> str:
    """The expression the (underlying arithmetic) question asks to evaluate: "12 + 7"."""
    return t.prompt_text.split("What is ")[1].split("?")[0]


def _right_forms(t: Task) -> list:
    """Every accepted way of giving the right answer to `t`."""
    if t.kind == "numeric":
        n = int(t.right)
        return [t.right, f"{n}.0", f"x = {n}", f"\\text{{{n}}}", f"{n} \\text{{ in total}}",
                f"{n:,}"]
    forms = [t.right, f"({t.right})", f"\\text{{{t.right}}}", f"{t.right}.", t.right.lower()]
    if t.kind in ("choice", "ab", "pairwise"):
        forms.append(f"Option {t.right}")
    if t.kind == "yes_no":
        forms.append(f"{t.right}, that is my verdict")
    if t.value is not None:
        forms += [f"{t.right}. {t.value}", f"({t.right}) {t.value}"]
        if t.truth != t.right:  # the truth gives the option's value ("C. 10"): the value alone answers too
            forms.append(t.value)
    return forms


HONEST: dict = {
    "right, first accepted form": lambda t, r: "Reasoning... " + _box(_right_forms(t)[0]),
    "right, a random accepted form": lambda t, r: "Reasoning... " + _box(r.choice(_right_forms(t))),
    "right, boxed twice in two forms": lambda t, r: " ".join(_box(f) for f in r.sample(_right_forms(t), 2)),
}


def _mean_rewards(policies: dict, tasks: list) -> dict:
    """{policy: {task kind: mean reward}} with the trainer's verifier (reward = accuracy, as in the reference)."""
    rng = random.Random(1)
    out = {}
    with Verifier(num_workers=0) as verifier:
        for name, policy in policies.items():
            responses = [(policy(t, rng), t.truth) for t in tasks]
            rewards = [v.reward for v in verifier.verify_batch(responses)]
            by_kind: dict = {}
            for t, rew in zip(tasks, rewards):
                by_kind.setdefault(t.kind, []).append(rew)
            out[name] = {k: sum(v) / len(v) for k, v in by_kind.items()}
            out[name]["all"] = sum(rewards) / len(rewards)
    return out


def test_every_hedging_policy_averages_zero(tasks):
    means = _mean_rewards(HEDGING, tasks)
    gamed = {name: m for name, m in means.items() if any(v != 0.0 for v in m.values())}
    assert not gamed, gamed


def test_correct_answers_in_every_accepted_form_average_one(tasks):
    means = _mean_rewards(HONEST, tasks)
    short = {name: m for name, m in means.items() if any(v != 1.0 for v in m.values())}
    assert not short, short
    rng = random.Random(2)
    with Verifier(num_workers=0) as verifier:  # and each form on its own, on every task
        for t in tasks[::7]:
            forms = _right_forms(t)
            verdicts = verifier.verify_batch([("so " + _box(f), t.truth) for f in forms])
            assert all(v.correct for v in verdicts), (t.kind, t.truth, [f for f, v in zip(forms, verdicts)
                                                                         if not v.correct])
            assert not verifier.verify("so " + _box(rng.choice(t.wrong)), t.truth).correct


def hedging_table(tasks: list) -> str:
    """Markdown table of the mean rewards (for the notes): python -c 'from tests.unit.test_reward_hedging import
    main; main()'."""
    means = {**_mean_rewards(HEDGING, tasks), **_mean_rewards(HONEST, tasks)}
    kinds = ["numeric", "choice", "yes_no", "ab", "pairwise", "all"]
    rows = ["| policy | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    rows += [f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in kinds) + " |" for name, m in means.items()]
    return "\n".join(rows)


def main() -> None:  # pragma: no cover - a reporting helper
    ts = all_tasks()
    print(f"{len(ts)} tasks")
    print(hedging_table(ts))
