"""The verifier: response text + ground truth -> Verdict (extracted answer, correctness, reward).

The rule, one for every task kind (policy answers, Yes/No and A/B judgments, reflections):

    A response is correct when it commits to exactly one final answer and that answer is the ground truth.
    It commits to every non-empty \\boxed{} it writes; where the ground truth is an option (Yes/No, or a letter
    A-J), to every option a box names; where the ground truth is a number, to a number only if a box states
    one (a computation that equals it, "12 + 7", has not answered yet). So every box must be equivalent to the
    ground truth, name no other option, and state the number itself.

Hence hedges are wrong: "B, C", "A or B", "A and C", "Yes or No", a box per option, two different boxed
answers, a box around a prompt's list of options or its own text, the question's arithmetic copied into the box.
The same answer boxed twice (in any two equivalent forms) is still one answer. Form stays
free: "(B)", "B", "B. 102", "option b", "\\text{Yes}", "yes.", "50\\%" for 0.5, "\\frac{1}{2}" for 0.5; a ground truth
"D. 12" accepts the label ("D") or the value ("12"). What counts as equivalent, and how options are named, is in
`equivalence.route` and `choice.named_options`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from spark_megatron.types import TaskKind, Verdict
from spark_megatron.verify.equivalence import Comparator, CheckResult, all_hold, check, pool_check, route, warm_up
from spark_megatron.verify.extraction import extract_boxed, extract_boxes
from spark_megatron.verify.pool import TimeoutPool


@dataclass
class VerifyRequest:
    """One response to check."""

    response_text: str
    ground_truth: str
    kind: TaskKind = TaskKind.POLICY
    """The task kind; the rule is the same for every kind (kept for callers that group verdicts by kind)."""


def format_score(response_text: str) -> float:
    """1.0 if the response ends its reasoning with a non-empty boxed answer, else 0.0."""
    return 1.0 if extract_boxed(response_text) is not None else 0.0


def combine_reward(correct: bool, fmt: float, format_weight: float) -> float:
    """reward = (1 - w) * accuracy + w * format; w = 0 gives the reference's plain 0/1 reward."""
    return (1.0 - format_weight) * float(correct) + format_weight * fmt


class Verifier:
    """Checks responses against ground truths; math equivalence runs in a pool with a hard per-item timeout.

    num_workers=0 checks in-process (bounded by a CPU-time signal timer in the main thread only; C-level work
    such as a huge integer power cannot be interrupted that way). num_workers>=1 uses worker processes that are
    killed when an answer has used `timeout_s` of CPU time (or `wall_factor * timeout_s` of wall time), so one
    pathological answer costs about `timeout_s` and is counted wrong (timed_out) while the batch completes.

    `comparator` replaces math-verify (a test hook; must be a picklable module-level function).
    """

    def __init__(self, timeout_s: float = 5.0, num_workers: int = 0, format_reward_weight: float = 0.0,
                 comparator: Optional[Comparator] = None, start_method: str = "forkserver", wall_factor: float = 10.0):
        if not 0.0 <= format_reward_weight <= 1.0:
            raise ValueError(f"format_reward_weight must be in [0, 1], got {format_reward_weight}")
        self.timeout_s = timeout_s
        self.format_reward_weight = format_reward_weight
        self.comparator = comparator
        self._pool = None
        if num_workers > 0:
            self._pool = TimeoutPool(functools.partial(pool_check, comparator=comparator), num_workers, timeout_s, start_method=start_method,
                                     preload=("spark_megatron.verify.equivalence", "math_verify"),
                                     init=None if comparator else warm_up, wall_factor=wall_factor)

    @classmethod
    def from_config(cls, cfg) -> "Verifier":
        """Build from an `AlgorithmConfig`."""
        return cls(timeout_s=cfg.verify_timeout_s, num_workers=cfg.verify_workers,
                   format_reward_weight=cfg.format_reward_weight)

    @property
    def pool_restarts(self) -> int:
        return self._pool.restarts if self._pool else 0

    def worker_pids(self) -> list:
        return self._pool.worker_pids() if self._pool else []

    def verify(self, response_text: str, ground_truth: str, kind: TaskKind = TaskKind.POLICY) -> Verdict:
        return self.verify_batch([VerifyRequest(response_text, ground_truth, kind)])[0]

    def verify_batch(self, requests: Sequence[Union[VerifyRequest, tuple]]) -> list[Verdict]:
        """Verdicts in input order. Items: VerifyRequest or (response_text, ground_truth[, kind]) tuples.

        Every distinct box of a response is checked (see the module's rule); math-verify runs once per distinct
        (answer, target) pair of the batch, since the n rollouts of a prompt repeat answers.
        """
        reqs = [r if isinstance(r, VerifyRequest) else VerifyRequest(*r) for r in requests]
        boxes = [list(dict.fromkeys(extract_boxes(r.response_text))) for r in reqs]
        claims: list = []  # per request: one CheckResult (settled) or a (prediction, target) key per box
        hard: dict[tuple, Optional[CheckResult]] = {}
        for req, answers in zip(reqs, boxes):
            mine = []
            for pred in answers if req.ground_truth.strip() else []:
                decision, target = route(pred, req.ground_truth)
                if decision is not None:
                    mine.append(CheckResult(decision))
                else:
                    hard.setdefault((pred, target), None)
                    mine.append((pred, target))
            claims.append(mine)
        for key, result in zip(list(hard), self._check_hard(list(hard))):
            hard[key] = result
        verdicts = []
        for req, answers, mine in zip(reqs, boxes, claims):
            res = all_hold([c if isinstance(c, CheckResult) else hard[c] for c in mine])
            verdicts.append(self._verdict(req, answers[0] if answers else None, res))
        return verdicts

    def _check_hard(self, pairs: list) -> list[CheckResult]:
        if not pairs:
            return []
        if self._pool is None:
            return [check(p, g, self.timeout_s, self.comparator) for p, g in pairs]
        results = self._pool.map(pairs)
        return [CheckResult(bool(r.value) if r.ok else False, timed_out=r.timed_out) for r in results]

    def _verdict(self, req: VerifyRequest, pred: Optional[str], res: CheckResult) -> Verdict:
        fmt = 1.0 if pred is not None else 0.0
        reward = combine_reward(res.correct, fmt, self.format_reward_weight)
        return Verdict(extracted=pred, correct=res.correct, reward=reward, timed_out=res.timed_out)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
