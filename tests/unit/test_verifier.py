"""Verifier: verdicts, rewards, judgment labels, and the worker pool's hard per-item timeout."""
import functools
import os
import time

import pytest

from spark_megatron.config import AlgorithmConfig
from spark_megatron.types import TaskKind
from spark_megatron.verify import TimeoutPool, Verifier, VerifyRequest
from spark_megatron.verify.equivalence import pool_check

pytestmark = pytest.mark.unit

PATHOLOGICAL = r"\boxed{9^{9^{9^{9^{9}}}}}"


# Module-level so worker processes can unpickle them.
def sleepy_comparator(prediction, ground_truth):
    if prediction == "slow":
        time.sleep(60)  # uses no CPU: only the wall-clock cap ends it
    return prediction == ground_truth


def spinning_comparator(prediction, ground_truth):
    if prediction == "slow":
        while True:  # burns CPU: the CPU-time limit ends it
            pass
    return prediction == ground_truth


def crashing_comparator(prediction, ground_truth):
    if prediction == "crash":
        os._exit(3)
    if prediction == "raise":
        raise RuntimeError("comparator bug")
    return prediction == ground_truth


CALLS = []


def counting_comparator(prediction, ground_truth):
    CALLS.append((prediction, ground_truth))
    return False


def test_verdict_fields_and_reward():
    v = Verifier()
    assert v.verify(r"so \boxed{\frac{3}{2}}", "1.5").correct
    assert not v.verify(r"so \boxed{\frac{6}{4}}", "1.5").correct  # a computation of 1.5, not the number
    verdict = v.verify(r"I think \boxed{2}", "3")
    assert (verdict.extracted, verdict.correct, verdict.reward, verdict.timed_out) == ("2", False, 0.0, False)
    verdict = v.verify("no box at all: 3", "3")
    assert verdict.extracted is None and not verdict.correct and verdict.reward == 0.0


def test_format_reward_weight():
    v = Verifier(format_reward_weight=0.1)
    assert v.verify(r"\boxed{3}", "3").reward == pytest.approx(1.0)
    assert v.verify(r"\boxed{4}", "3").reward == pytest.approx(0.1)
    assert v.verify("3", "3").reward == pytest.approx(0.0)
    with pytest.raises(ValueError):
        Verifier(format_reward_weight=1.5)


@pytest.mark.parametrize("kind, text, label, ok", [
    (TaskKind.POINTWISE, r"\boxed{yes.}", "Yes", True),
    (TaskKind.POINTWISE, r"\boxed{No}", "Yes", False),
    (TaskKind.POINTWISE, r"\boxed{\text{No}}", "No", True),
    (TaskKind.POINTWISE, r"\boxed{(A)}", "A", True),
    (TaskKind.POINTWISE, r"\boxed{B}", "A", False),
    (TaskKind.PAIRWISE, r"\boxed{B}", "B", True),
    (TaskKind.PAIRWISE, r"\boxed{(B) 102}", "B", True),
    (TaskKind.PAIRWISE, r"\boxed{A}", "B", False),
    (TaskKind.PAIRWISE, r"\boxed{both}", "B", False),
    (TaskKind.REFLECTION, r"\boxed{0.5}", r"\frac{1}{2}", True),
])
def test_kinds(kind, text, label, ok):
    assert Verifier().verify(text, label, kind).correct is ok


def test_batch_accepts_tuples_and_dedupes_checks():
    CALLS.clear()
    v = Verifier(comparator=counting_comparator)
    out = v.verify_batch([(r"\boxed{x+1}", "y")] * 5 + [VerifyRequest(r"\boxed{x+2}", "y")])
    assert len(out) == 6 and not any(o.correct for o in out)
    assert sorted(CALLS) == [("x+1", "y"), ("x+2", "y")]


def test_from_config():
    cfg = AlgorithmConfig(format_reward_weight=0.25, verify_workers=0, verify_timeout_s=2.0)
    v = Verifier.from_config(cfg)
    assert v.format_reward_weight == 0.25 and v.timeout_s == 2.0


def test_pool_cuts_off_pathological_input_and_finishes_the_rest():
    good = [(rf"\boxed{{\frac{{{2 * i + 1}}}{{2}}}}", str(i + 0.5)) for i in range(1, 7)]
    batch = good[:3] + [(PATHOLOGICAL, "10^{3}")] + good[3:] + [(r"\boxed{x^2-1}", "(x-1)(x+1)")]
    with Verifier(timeout_s=1.0, num_workers=2) as v:
        t0 = time.monotonic()
        out = v.verify_batch(batch)
        elapsed = time.monotonic() - t0
        assert [o.correct for o in out] == [True] * 3 + [False] + [True] * 4
        assert [o.timed_out for o in out] == [False] * 3 + [True] + [False] * 4
        assert elapsed < 60 and v.pool_restarts == 1  # uncut, it ran > 120 s
        again = v.verify_batch(good)  # the pool keeps working after a kill
        assert all(o.correct for o in again)


@pytest.mark.parametrize("comparator, wall_factor", [(spinning_comparator, 10.0), (sleepy_comparator, 2.0)])
def test_pool_with_injected_slow_comparator(comparator, wall_factor):
    # Distinct strings, so the string fast path leaves every pair to the comparator.
    batch = [(r"\boxed{a}", "b"), (r"\boxed{slow}", "x"), (r"\boxed{c}", "d"), (r"\boxed{e}", "e!")]
    with Verifier(timeout_s=0.5, num_workers=2, comparator=comparator, wall_factor=wall_factor) as v:
        t0 = time.monotonic()
        out = v.verify_batch(batch)
        assert time.monotonic() - t0 < 30  # the sleeping item alone would take 60 s
    assert [o.timed_out for o in out] == [False, True, False, False]
    assert not any(o.correct for o in out)


def test_cpu_clock_ignores_time_spent_waiting_for_the_cpu():
    from spark_megatron.verify.pool import _cpu_seconds, _ItemClock

    assert _cpu_seconds(os.getpid()) is not None
    clock = _ItemClock(os.getpid(), limit=1.0, wall_cap=100.0)
    time.sleep(0.2)
    assert not clock.expired(clock.started + 5.0)  # 5 s "elapsed" but little CPU used: not over the limit
    assert clock.check_at > clock.started + 5.0
    assert clock.expired(clock.started + 100.0)  # the wall-clock cap


def test_pool_survives_crash_and_exception():
    with TimeoutPool(functools.partial(pool_check, comparator=crashing_comparator), 2, 5.0) as pool:
        res = pool.map([("crash", "z"), ("raise", "z"), ("q", "q")])
    assert res[0].error == "worker process died" and not res[0].timed_out
    assert res[1].ok and res[1].value is False  # pool_check maps comparator errors to "not equal"
    assert res[2].ok and res[2].value is True


def test_pool_rejects_fork():
    with pytest.raises(ValueError):
        TimeoutPool(sleepy_comparator, 1, 1.0, start_method="fork")
