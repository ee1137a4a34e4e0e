"""Answer equivalence: choice labels, normalised strings, then `math-verify` (parse + verify).

`check` is the single-answer decision used both in-process and inside the verifier's worker processes; `route`
settles what needs no sympy and names what math-verify must compare.
math-verify's own timeouts rely on SIGALRM, which only works in a process's main thread, and its timeout
failures are indistinguishable from "not equal". We therefore switch them off and bound the work ourselves:
in-process with our own CPU-time interval timer (main thread only), and in the worker pool by killing the
worker.
"""
from __future__ import annotations

import functools
import logging
import math
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

from spark_megatron.verify.choice import unwrap, named_options, parse_ground_truth
from spark_megatron.verify.extraction import contains_box, extract_boxes

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


_DIGITS = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(rf"[+-]?{_DIGITS}")
_DECIMAL = re.compile(rf"[+-]?{_DIGITS}(?:(?:\\times|\\cdot|\*)10\^\{{?[+-]?\d+\}}?|e[+-]?\d+)?")
_FRACTION = re.compile(r"([+-]?)(\d*)(?:\\frac\{([+-]?\d+)\}\{(\d+)\}|\\frac(\d)(\d)|(\d+)/(\d+))")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_ASSIGNED = re.compile(r"^[a-z]=")
_UNITS = re.compile(r"(?:\\?%|[a-z]+)$")


@functools.lru_cache(maxsize=4096)
def is_plain_number(text: str) -> bool:
    """An integer or decimal written out ("12", "-0.5", "1,000", "6."): a ground truth that asks for a value."""
    return _PLAIN_NUMBER.fullmatch(_THOUSANDS.sub("", normalize_answer(text))) is not None


def states_a_number(text: str) -> bool:
    """True if `text` states a number as a value rather than a computation that equals it: an integer or a decimal
    (thousands commas, scientific notation), a fraction in lowest terms (a mixed number too), a percentage; units,
    degrees and an "x =" in front are fine. "3 + 4", "1 \\cdot 19", "\\frac{12}{2}" and "\\sqrt{4}" are not."""
    s = _ASSIGNED.sub("", _THOUSANDS.sub("", normalize_answer(text)))
    s = _UNITS.sub("", s) or s
    if _DECIMAL.fullmatch(s):
        return True
    m = _FRACTION.fullmatch(s)
    if m is None:
        return False
    num, den = (int(x) for x in ((m.group(3), m.group(4)) if m.group(3) else
                                 (m.group(5), m.group(6)) if m.group(5) else (m.group(7), m.group(8))))
    proper = not m.group(2) or abs(num) < den
    return den > 1 and math.gcd(num, den) == 1 and proper


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

def route(prediction: str, ground_truth: str) -> tuple:
    """(decision, target): decide without sympy where possible, else name what math-verify must compare.

    decision is True/False when settled here (choice options, word answers, identical normalised strings, a
    computation given for a number), None when only math-verify can decide whether `prediction` equals `target`. For an option ground truth the options
    the answer names decide: it must name exactly the right one ("B, C" names two). An answer naming no option
    is compared with the option's value where the truth gives one ("D. 12" accepts "12"); the option's own text
    inside an answer ("(C) Point A") is its value, not a second option.
    """
    truth = parse_ground_truth(ground_truth)
    if truth is not None:
        s = unwrap(prediction)
        value = unwrap(truth.text) if truth.text else ""
        named = named_options(s.replace(value, " ") if value else s, truth.family)
        if named or not value:
            return named == [truth.label], ground_truth
        ground_truth = truth.text
    if normalize_answer(prediction) == normalize_answer(ground_truth):
        return True, ground_truth
    if is_text_answer(ground_truth):
        return False, ground_truth
    if is_plain_number(ground_truth) and not states_a_number(prediction):
        return False, ground_truth  # a numeric question asks for the number, not the computation ("12 + 7")
    return None, ground_truth


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
    """Is `prediction` (one extracted answer) equivalent to `ground_truth`? In-process, bounded by `timeout_s`.

    Errors inside math-verify count as "not equivalent"; a timeout counts as wrong with `timed_out=True`.
    """
    global _warned_threads
    if prediction is None or not prediction.strip() or not ground_truth.strip():
        return CheckResult(False)
    decision, target = route(prediction, ground_truth)
    if decision is not None:
        return CheckResult(decision)
    if timeout_s and threading.current_thread() is not threading.main_thread() and not _warned_threads:
        logger.warning("in-process answer checks outside the main thread run without a timeout; "
                       "use Verifier(num_workers>0) to bound them")
        _warned_threads = True
    try:
        with time_limit(timeout_s):
            return CheckResult((comparator or math_equivalent)(prediction, target))
    except _Deadline:
        return CheckResult(False, timed_out=True)
    except Exception:  # malformed LaTeX and sympy internals: an answer we cannot read is not correct
        logger.debug("answer comparison failed", exc_info=True)
        return CheckResult(False)


def all_hold(results: list) -> CheckResult:
    """One verdict from the checks of every answer a response commits to: correct only if all are; timed out
    only if none is definitely wrong and one could not be decided (then the response's label is unknown)."""
    if not results:
        return CheckResult(False)
    correct = all(r.correct for r in results)
    undecided = any(r.timed_out for r in results) and not any(not r.correct and not r.timed_out for r in results)
    return CheckResult(correct, timed_out=undecided and not correct)


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
    """True if `prediction` is equivalent to `ground_truth`, under the verifier's rule (see
    `spark_megatron.verify.verifier`).

    `prediction` is a final answer; if it still contains ``\\boxed{}`` groups, every non-empty box must hold.
    Runs in-process (bounded by `timeout_s` in the main thread); use `Verifier` for pooled, hard-bounded checks.
    """
    if contains_box(prediction):
        boxes = list(dict.fromkeys(extract_boxes(prediction)))
        return all_hold([check(b, ground_truth, timeout_s) for b in boxes]).correct
    return check(prediction, ground_truth, timeout_s).correct
