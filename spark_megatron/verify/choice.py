"""Choice answers: Yes/No verdicts and lettered options ("(B) 102" -> "B"), and which options an answer names.

An option is named by a standalone word: "yes"/"no" (any case) for verdicts, a single letter A-J for lettered
options. Lower-case letters are read as options only in an answer with no upper-case letter at all ("b", "(c)",
"option b"); elsewhere a lower-case letter is a word or a variable ("a correct answer", "x = a + b").
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

LETTERS = "ABCDEFGHIJ"
"""Option letters recognised as choice labels (A-J covers every multiple-choice set in the target data)."""

YES_NO = "yes_no"
LETTER = "letter"

_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]*)\}")
_VERDICT_WORD = re.compile(r"(?<![A-Za-z])(yes|no)(?![A-Za-z])", re.IGNORECASE)
_LETTER_WORD = re.compile(r"(?<![A-Za-z0-9\\])([A-J])(?![A-Za-z0-9])")
_GT_LETTER = re.compile(r"^\(?([A-J])\)?\.?$")
_GT_LETTER_WITH_TEXT = re.compile(r"^(?:\(([A-J])\)|([A-J])[.:)])\s*(\S.*)$", re.DOTALL)


def unwrap(text: str) -> str:
    """Drop math delimiters, emphasis and \\text{} wrappers; keep the inner words."""
    s = text.strip()
    for _ in range(3):  # nested wrappers such as \textbf{\text{Yes}}
        s = _WRAPPERS.sub(r"\1", s)
    s = s.replace("$", "").replace("**", "").strip()
    return s.strip(" \t\n'\"`")


@dataclass(frozen=True)
class ChoiceTruth:
    """A ground truth that is an option: its label, its family, and the option's own text if the truth gives it."""

    label: str
    """"Yes", "No" or a letter "A".."J"."""
    family: str
    """YES_NO or LETTER: the options a response to this question can name."""
    text: Optional[str] = None
    """The option's value for truths like "D. 12" or "(B) 102" (an answer may give it instead of the letter)."""


@functools.lru_cache(maxsize=4096)  # the n rollouts of a prompt share its ground truth
def parse_ground_truth(ground_truth: str) -> Optional[ChoiceTruth]:
    """The option a ground truth denotes, or None when it is an ordinary (math/text) answer.

    Only "Yes"/"No" (any case), an upper-case letter A-J alone or in parentheses, or a letter with its option text
    ("D. 12", "D) 12", "D: 12", "(D) 12"). A lower-case "a" or "b" is a math variable, not an option.
    """
    s = unwrap(ground_truth)
    word = s.lower().rstrip(".")
    if word in ("yes", "no"):
        return ChoiceTruth(word.capitalize(), YES_NO)
    m = _GT_LETTER.match(s)
    if m:
        return ChoiceTruth(m.group(1), LETTER)
    m = _GT_LETTER_WITH_TEXT.match(s)
    if m:
        return ChoiceTruth(m.group(1) or m.group(2), LETTER, m.group(3).strip())
    return None


def ground_truth_choice(ground_truth: str) -> Optional[str]:
    """The choice label a ground truth denotes ("Yes", "No", "A".."J"), or None (see `parse_ground_truth`)."""
    truth = parse_ground_truth(ground_truth)
    return truth.label if truth else None


def named_options(text: Optional[str], family: str) -> list:
    """Distinct options of `family` that `text` names, in order of first mention.

    "B, C" -> [B, C]; "Yes or No" -> [Yes, No]; "(B) 102" -> [B]; "option b" -> [B]; "Both" -> [].
    """
    if not text:
        return []
    s = unwrap(text)
    if family == YES_NO:
        found = [m.group(1).capitalize() for m in _VERDICT_WORD.finditer(s)]
    else:
        if not any(c.isupper() for c in s):
            s = s.upper()  # "b", "(c)", "option b": no capitals, so the letters are the options
        found = [m.group(1) for m in _LETTER_WORD.finditer(s)]
    return list(dict.fromkeys(found))


def choice_label(text: Optional[str]) -> Optional[str]:
    """Normalise a judge's answer to "Yes", "No" or an option letter "A".."J"; None if it names none, or more
    than one, of the options of its kind (a verdict word wins over letters: "Yes, A is right" -> "Yes").

    Accepts "yes", "Yes.", "\\text{No}", "(B)", "B. 102", "(B) 102", "option b", "Answer: C".
    """
    for family in (YES_NO, LETTER):
        named = named_options(text, family)
        if named:
            return named[0] if len(named) == 1 else None
    return None
