"""Turn policy-period rollout groups into judgment (pointwise / pairwise) and reflection tasks.

Selection rules (SPARK_SPEC.md, "Recycling"), per policy group, with rollouts whose check timed out left out
(their label is unknown):
  all correct -> pointwise on one correct rollout, label Yes (A in the A/B phrasing);
  all wrong   -> pointwise on a wrong rollout that has an extracted answer, label No (B); none: no judgment;
  mixed       -> p = pointwise_prob_mixed: pointwise on a correct or a wrong rollout (50/50), labelled by its
                 correctness; otherwise pairwise, one correct + one wrong in random order, label = the letter of
                 the correct one. (A mixed group whose wrong rollouts all lack an answer falls back to pointwise
                 on a correct one: a judge cannot compare against a missing answer.)
  reflection  -> only for groups with a wrong rollout: the question and one wrong response (the full chain of
                 thought with p = reflection_full_cot_prob, else only its final answer); label = ground truth.
Randomness comes from Random(f"{seed}/{step}/{group index}/{uid}"), so a step's samples are reproducible
without checkpointing RNG state. Per-kind caps keep a seeded random subset, in group order. With a `fitter`,
a task longer than rollout.max_prompt_tokens has its quoted responses cut (recycle/fitting.py states the rule)
or is dropped; both are counted.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

from spark_megatron.data import question as q
from spark_megatron.recycle import templates
from spark_megatron.recycle.fitting import PromptFitter, Quoted
from spark_megatron.types import Prompt, Rollout, RolloutGroup, TaskKind

JUDGE_INPUTS = ("answer", "cot", "both", "mixed")
LABEL_STYLES = ("yes_no", "ab", "both")


@dataclass
class RecycleStats:
    """Counters of one `build` call (log them as metrics)."""

    groups: int = 0
    skipped_recycled: int = 0
    """Groups of recycled tasks: never recycled again."""
    skipped_unusable: int = 0
    """Groups without any rollout that has a (non-timed-out) verdict."""
    timed_out_rollouts: int = 0
    all_correct: int = 0
    all_wrong: int = 0
    mixed: int = 0
    pointwise: int = 0
    pointwise_positive: int = 0
    """Pointwise samples whose label says "correct" (Yes / A)."""
    pairwise: int = 0
    reflection: int = 0
    reflection_cot: int = 0
    no_judgment_no_answer: int = 0
    """All-wrong groups where no rollout has an extracted answer."""
    dropped_judgment_cap: int = 0
    dropped_reflection_cap: int = 0
    fitted: int = 0
    """Tasks whose quoted response was cut to fit rollout.max_prompt_tokens."""
    dropped_too_long: int = 0
    """Tasks that did not fit rollout.max_prompt_tokens even with the quoted responses cut away."""

    def as_metrics(self, prefix: str = "recycle/") -> dict:
        return {prefix + k: float(v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class RecycleResult:
    samples: list = field(default_factory=list)
    """New Prompt tasks (kinds POINTWISE / PAIRWISE / REFLECTION), in group order."""
    stats: RecycleStats = field(default_factory=RecycleStats)


@dataclass
class _Group:
    """A group's rollouts sorted by outcome; timed-out ones are excluded."""

    prompt: Prompt
    correct: list
    wrong: list
    wrong_answered: list

    @classmethod
    def of(cls, group: RolloutGroup) -> "_Group":
        usable = [r for r in group.rollouts if r.verdict is not None and not r.verdict.timed_out]
        correct = [r for r in usable if r.verdict.correct]
        wrong = [r for r in usable if not r.verdict.correct]
        answered = [r for r in wrong if r.verdict.extracted]
        return cls(group.prompt, correct, wrong, answered)


class RecycleBuilder:
    """Builds recycled tasks from the verified rollout groups of one policy step.

    `cfg` is a RecycleConfig; `seed` the run seed; `fitter` (optional) fits tasks to the prompt limit.
    """

    def __init__(self, cfg, seed: int = 0, fitter: Optional[PromptFitter] = None):
        if cfg.judge_input not in JUDGE_INPUTS:
            raise ValueError(f"recycle.judge_input must be one of {JUDGE_INPUTS}, got {cfg.judge_input!r}")
        if cfg.label_style not in LABEL_STYLES:
            raise ValueError(f"recycle.label_style must be one of {LABEL_STYLES}, got {cfg.label_style!r}")
        self.cfg, self.seed, self.fitter = cfg, seed, fitter

    # ------------------------------------------------------------------------------------------ step

    def build(self, groups: Sequence[RolloutGroup], step: int) -> RecycleResult:
        """Recycled samples of one step: at most one judgment and one reflection per group, then the caps."""
        result = RecycleResult()
        if not self.cfg.enabled:
            return result
        stats = result.stats
        judgments, reflections = [], []
        for i, group in enumerate(groups):
            stats.groups += 1
            if TaskKind(group.prompt.kind).recycled:
                stats.skipped_recycled += 1
                continue
            stats.timed_out_rollouts += sum(1 for r in group.rollouts if r.verdict and r.verdict.timed_out)
            view = _Group.of(group)
            if not view.correct and not view.wrong:
                stats.skipped_unusable += 1
                continue
            rng = random.Random(f"{self.seed}/{step}/{i}/{group.prompt.uid}")
            judgment = self.judgment_sample(view, rng, stats)
            reflection = self.reflection_sample(view, rng, stats)
            judgments += [(i, judgment)] if judgment else []
            reflections += [(i, reflection)] if reflection else []
        cap_rng = random.Random(f"{self.seed}/{step}/cap")
        judgments = self._cap(judgments, self.cfg.max_judgment_per_step, cap_rng)
        reflections = self._cap(reflections, self.cfg.max_reflection_per_step, cap_rng)
        stats.dropped_judgment_cap = stats.pointwise + stats.pairwise - len(judgments)
        stats.dropped_reflection_cap = stats.reflection - len(reflections)
        result.samples = [s for _, s in sorted(judgments + reflections, key=lambda t: t[0])]
        return result

    @staticmethod
    def _cap(items: list, cap: int, rng: random.Random) -> list:
        if cap < 0 or len(items) <= cap:
            return items
        keep = sorted(rng.sample(range(len(items)), cap))
        return [items[k] for k in keep]

    # ------------------------------------------------------------------------------------------ judgment

    def judgment_sample(self, g: _Group, rng: random.Random, stats: RecycleStats) -> Optional[Prompt]:
        if not g.wrong:
            stats.all_correct += 1
            return self._pointwise(g.prompt, rng.choice(g.correct), rng, stats)
        if not g.correct:
            stats.all_wrong += 1
            if not g.wrong_answered:
                stats.no_judgment_no_answer += 1
                return None
            return self._pointwise(g.prompt, rng.choice(g.wrong_answered), rng, stats)
        stats.mixed += 1
        pointwise = rng.random() < self.cfg.pointwise_prob_mixed
        pick_correct = rng.random() < 0.5
        if not g.wrong_answered:
            return self._pointwise(g.prompt, rng.choice(g.correct), rng, stats)
        if pointwise:
            pool = g.correct if pick_correct else g.wrong_answered
            return self._pointwise(g.prompt, rng.choice(pool), rng, stats)
        return self._pairwise(g.prompt, rng.choice(g.correct), rng.choice(g.wrong_answered), rng, stats)

    def _shows_cot(self, rng: random.Random) -> bool:
        mode = self.cfg.judge_input
        return rng.random() < 0.5 if mode == "mixed" else mode in ("cot", "both")

    def _shown(self, rollout: Rollout, shows_cot: bool) -> Quoted:
        """What the judge sees of a rollout: its final answer, or its reasoning (plus the answer for `both`)."""
        answer = rollout.verdict.extracted or ""
        if not shows_cot:
            return Quoted(answer, answer)
        text = rollout.response_text.strip()
        if self.cfg.judge_input == "both" and answer:
            text += f"\n\nFinal answer: {answer}"
        return Quoted(text, answer or None)

    def _pointwise(self, prompt: Prompt, rollout: Rollout, rng: random.Random, stats: RecycleStats) -> Prompt:
        style = self.cfg.label_style
        if style == "both":
            style = "yes_no" if rng.random() < 0.5 else "ab"
        good = rollout.verdict.correct
        label = ("Yes" if good else "No") if style == "yes_no" else ("A" if good else "B")
        shows_cot = self._shows_cot(rng)
        text = self._render(f"pointwise_{style}", prompt, rng, shows_cot, stats,
                            response=self._shown(rollout, shows_cot))
        if text is None:
            return None
        stats.pointwise += 1
        stats.pointwise_positive += int(good)
        return self._task(prompt, TaskKind.POINTWISE, text, label)

    def _pairwise(self, prompt: Prompt, good: Rollout, bad: Rollout, rng: random.Random,
                  stats: RecycleStats) -> Prompt:
        good_first = rng.random() < 0.5
        first, second = (good, bad) if good_first else (bad, good)
        shows_cot = self._shows_cot(rng)
        text = self._render("pairwise", prompt, rng, shows_cot, stats, response_a=self._shown(first, shows_cot),
                            response_b=self._shown(second, shows_cot))
        if text is None:
            return None
        stats.pairwise += 1
        return self._task(prompt, TaskKind.PAIRWISE, text, "A" if good_first else "B")

    # ------------------------------------------------------------------------------------------ reflection

    def reflection_sample(self, g: _Group, rng: random.Random, stats: RecycleStats) -> Optional[Prompt]:
        if not g.wrong:
            return None
        shows_cot = rng.random() < self.cfg.reflection_full_cot_prob
        if not shows_cot and not g.wrong_answered:
            shows_cot = True  # nothing to show but the reasoning
        rollout = rng.choice(g.wrong if shows_cot else g.wrong_answered)
        answer = rollout.verdict.extracted
        shown = Quoted(rollout.response_text.strip(), answer) if shows_cot else Quoted(answer, answer)
        text = self._render("reflection", g.prompt, rng, shows_cot, stats, response=shown)
        if text is None:
            return None
        stats.reflection += 1
        stats.reflection_cot += int(shows_cot)
        return self._task(g.prompt, TaskKind.REFLECTION, text, g.prompt.ground_truth)

    # ------------------------------------------------------------------------------------------ common

    def _render(self, task: str, prompt: Prompt, rng: random.Random, shows_cot: bool, stats: RecycleStats,
                **slots: Quoted) -> Optional[str]:
        """The task text (None: too long for the prompt limit even when cut; counted in `stats`)."""
        modality = "image" if q.has_images(prompt) else "text"
        index = rng.randrange(templates.template_count(task, modality))
        question = q.question_text(prompt)

        def text(values: dict) -> str:
            return templates.render(task, modality, index, shows_cot=shows_cot, question=question, **values)

        if self.fitter is None:
            return text({k: v.text for k, v in slots.items()})
        fitted = self.fitter.fit(lambda values: q.task_messages(prompt, text(values)), slots)
        if fitted is None:
            stats.dropped_too_long += 1
            return None
        stats.fitted += int(fitted[1])
        return text(fitted[0])

    @staticmethod
    def _task(prompt: Prompt, kind: TaskKind, text: str, label: str) -> Prompt:
        return Prompt(uid=f"{prompt.uid}/{kind.value}", messages=q.task_messages(prompt, text), ground_truth=label,
                      images=list(prompt.images), kind=kind, origin_uid=prompt.uid)
