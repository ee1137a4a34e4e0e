"""Answer equivalence: choice labels, normalised strings, then `math-verify` (parse + verify).

`check` is the single-item decision used both in-process and inside the verifier's worker processes.
math-verify's own timeouts rely on SIGALRM, which only works in a process's main thread, and its timeout
failures are indistinguishable from "not equal". We therefore switch them off and bound the work ourselves:
in-process with our own CPU-time interval timer (main thread only), and in the worker pool by killing the
worker.
"""
from __future__ import annotations

import logging
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

from spark_megatron.verify.choice import choice_label, ground_truth_choice
from spark_megatron.verify.extraction import contains_box, extract_boxed

logger = logging.getLogger(__name__)

Comparator = Callable[[str, str], bool]
"""(prediction, ground_truth) -> equivalent; must be a module-level function to cross into worker processes."""


@dataclass(frozen=True)
class CheckResult:
    correct: bool
    timed_out: bool = False


class _Deadline(BaseException):
    """Raised by our timer. A BaseException so math-verify's `except Exception` blocks cannot swallow it."""


class _DropDisabledTimeoutNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutNotice())


# ---------------------------------------------------------------------------------------------- strings

_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREE = re.compile(r"\^\s*\{?\\circ\}?|°")
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "lim", "max", "min", "det"}


def normalize_answer(text: str) -> str:
    """Canonical string form for the string fallback: layout-only LaTeX removed, spaces dropped, lower case."""
    s = text.strip()
    for _ in range(3):
        s = _TEXT_WRAP.sub(r"\1", s)
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = _SPACING.sub("", s)
    s = _DEGREE.sub("", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s.lower()


def is_text_answer(ground_truth: str) -> bool:
    """True for word answers ("east", "red triangle"), which are compared as strings only.

    sympy reads a bare word as a product of symbols, so math-verify would accept any anagram ("east" == "seat").
    """
    s = ground_truth.strip()
    if re.fullmatch(r"\\text\s*\{[^{}]*[A-Za-z]{2,}[^{}]*\}", s):
        return True
    words = s.split()
    if not words or not all(re.fullmatch(r"[A-Za-z][A-Za-z'\-]*", w) for w in words):
        return False
    return any(len(w) >= 3 for w in words) and not any(w.lower() in _MATH_WORDS for w in words)


# ---------------------------------------------------------------------------------------------- decisions

def quick_check(prediction: str, ground_truth: str) -> Optional[bool]:
    """Decide without sympy where possible: choice labels, word answers, identical normalised strings.

    Returns None when only math-verify can decide.
    """
    gt_choice = ground_truth_choice(ground_truth)
    if gt_choice is not None:
        return choice_label(prediction) == gt_choice
    if normalize_answer(prediction) == normalize_answer(ground_truth):
        return True
    if is_text_answer(ground_truth):
        return False
    return None


def _drop_full_stop(text: str) -> str:
    """"6." -> "6": a sentence's full stop inside the box makes math-verify fail to parse (but keep "...")."""
    s = text.strip()
    return s[:-1] if s.endswith(".") and not s.endswith("..") and len(s) > 1 else s


def math_equivalent(prediction: str, ground_truth: str) -> bool:
    """math-verify parse + verify with its internal (signal) timeouts off; bound the call from outside."""
    from math_verify import parse, verify  # imported lazily: sympy costs ~1 s at import

    gold = parse("\\boxed{" + _drop_full_stop(ground_truth) + "}", parsing_timeout=None)
    pred = parse("\\boxed{" + _drop_full_stop(prediction) + "}", parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


@contextmanager
def time_limit(seconds: Optional[float]):
    """Raise `_Deadline` in the main thread once this process has used `seconds` more CPU time; a no-op in
    other threads (signals need the main thread).

    CPU time (ITIMER_PROF), like the worker pool, so a machine crowded with other processes does not turn
    ordinary answers into timeouts. A profiling timer already armed by someone else is re-armed afterwards.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _fire(signum, frame):
        raise _Deadline()

    old_handler = signal.signal(signal.SIGPROF, _fire)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_PROF, seconds)
    t0 = time.process_time()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old_handler)
        if old_delay > 0:
            remaining = max(old_delay - (time.process_time() - t0), 1e-3)
            signal.setitimer(signal.ITIMER_PROF, remaining, old_interval)


_warned_threads = False


def check(prediction: Optional[str], ground_truth: str, timeout_s: Optional[float] = None,
          comparator: Optional[Comparator] = None) -> CheckResult:
    """Is `prediction` (an extracted answer) equivalent to `ground_truth`? In-process, bounded by `timeout_s`.

    Errors inside math-verify count as "not equivalent"; a timeout counts as wrong with `timed_out=True`.
    """
    global _warned_threads
    if prediction is None or not prediction.strip() or not ground_truth.strip():
        return CheckResult(False)
    quick = quick_check(prediction, ground_truth)
    if quick is not None:
        return CheckResult(quick)
    if timeout_s and threading.current_thread() is not threading.main_thread() and not _warned_threads:
        logger.warning("in-process answer checks outside the main thread run without a timeout; "
                       "use Verifier(num_workers>0) to bound them")
        _warned_threads = True
    try:
        with time_limit(timeout_s):
            return CheckResult((comparator or math_equivalent)(prediction, ground_truth))
    except _Deadline:
        return CheckResult(False, timed_out=True)
    except Exception:  # malformed LaTeX and sympy internals: an answer we cannot read is not correct
        logger.debug("answer comparison failed", exc_info=True)
        return CheckResult(False)


def pool_check(item: tuple, comparator: Optional[Comparator] = None) -> bool:
    """Worker-side entry point: (prediction, ground_truth) -> equivalent.

    Runs without an in-process timer: the pool enforces the limit by killing the worker, which also stops
    work that a signal cannot interrupt (huge integer powers inside C code). Bind `comparator` with
    functools.partial so that it is unpickled once when the worker starts, not per item.
    """
    prediction, ground_truth = item
    try:
        return bool((comparator or math_equivalent)(prediction, ground_truth))
    except Exception:
        return False


_WARM_UP_PAIRS = (("\\frac{1}{2}", "0.5"), ("(x+1)(x+2)", "x^2+3x+2"), ("[1,2)", "(1,2]"),
                  ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"), ("x=3", "3"))


def warm_up() -> None:
    """Exercise the LaTeX parser and sympy's simplification once (about 1 s of one-off cost in a fresh process),
    so that cost never lands on an answer's timeout."""
    for prediction, ground_truth in _WARM_UP_PAIRS:
        pool_check((prediction, ground_truth))


def is_correct(prediction: Optional[str], ground_truth: str, timeout_s: Optional[float] = 5.0) -> bool:
    """True if `prediction` is equivalent to `ground_truth`.

    `prediction` is a final answer; if it still contains a ``\\boxed{}``, the boxed content is used.
    Runs in-process (bounded by `timeout_s` in the main thread); use `Verifier` for pooled, hard-bounded checks.
    """
    if contains_box(prediction):
        prediction = extract_boxed(prediction)
    return check(prediction, ground_truth, timeout_s).correct
