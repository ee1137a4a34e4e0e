"""Choice labels: Yes/No verdicts and lettered options ("(B) 102" -> "B")."""
from __future__ import annotations

import re
from typing import Optional

LETTERS = "ABCDEFGHIJ"
"""Option letters recognised as choice labels (A-J covers every multiple-choice set in the target data)."""

_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]*)\}")
_YES_NO = re.compile(r"^(yes|no)(?:$|[\s.,;:!)])", re.IGNORECASE)
_LETTER = re.compile(r"^(?:(?:option|choice|answer)\s*:?\s*)?\(?([a-j])(?:$|\)|[.:,]|\s)", re.IGNORECASE)
_LETTER_ONLY = re.compile(r"^\(?([A-J])\)?$")
_LETTER_WITH_TEXT = re.compile(r"^\(([A-J])\)\s+\S")


def _unwrap(text: str) -> str:
    """Drop math delimiters, emphasis and \\text{} wrappers; keep the inner words."""
    s = text.strip()
    for _ in range(3):  # nested wrappers such as \textbf{\text{Yes}}
        s = _WRAPPERS.sub(r"\1", s)
    s = s.replace("$", "").replace("**", "").strip()
    return s.strip(" \t\n'\"`")


def choice_label(text: Optional[str]) -> Optional[str]:
    """Normalise a judge's answer to "Yes", "No" or an option letter "A".."J"; None if it is none of these.

    Accepts "yes", "Yes.", "\\text{No}", "(B)", "B. 102", "(B) 102", "option b", "Answer: C".
    """
    if text is None:
        return None
    s = _unwrap(text)
    if not s:
        return None
    m = _YES_NO.match(s)
    if m:
        return m.group(1).capitalize()
    m = _LETTER.match(s)
    if m:
        return m.group(1).upper()
    return None


def ground_truth_choice(ground_truth: str) -> Optional[str]:
    """The choice label a ground truth denotes, or None when it is an ordinary (math/text) answer.

    Stricter than `choice_label`: only "Yes"/"No" (any case), an upper-case letter A-J alone or in parentheses,
    or "(B) some text". A lower-case "a" or "b" is a math variable, not an option.
    """
    s = _unwrap(ground_truth)
    if s.lower().rstrip(".") in ("yes", "no"):
        return s.lower().rstrip(".").capitalize()
    m = _LETTER_ONLY.match(s) or _LETTER_WITH_TEXT.match(s)
    return m.group(1) if m else None
