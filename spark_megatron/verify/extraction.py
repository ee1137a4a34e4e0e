"""Final-answer extraction: the content of the first brace-matched ``\\boxed{...}`` (or ``\\box{...}``)."""
from __future__ import annotations

import re
from typing import Optional

# `\boxed {x}` (space before the brace) is valid LaTeX and models do emit it.
_BOX_OPEN = re.compile(r"\\(?:boxed|box)\s*\{")


def _matching_close(text: str, start: int) -> Optional[int]:
    """Index of the `}` closing the group whose content begins at `start`, or None if unbalanced."""
    depth = 1
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            # `\{`, `\}` are literal braces (sets) and `\\` is a LaTeX newline (matrices): neither opens/closes.
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def contains_box(text: Optional[str]) -> bool:
    """True if `text` has a ``\\boxed{`` / ``\\box{`` opening anywhere."""
    return bool(text) and _BOX_OPEN.search(text) is not None


def extract_boxed(text: Optional[str]) -> Optional[str]:
    """Content of the first non-empty, brace-matched ``\\boxed{...}`` in `text`, stripped; None if there is none.

    An empty ``\\boxed{}`` is skipped rather than taken as the answer: responses often echo the instruction
    "put the final answer in \\boxed{}" before answering. An unclosed box ends the search (None): everything
    after it is inside the box, so no later box can be a well-formed final answer.
    """
    if not text:
        return None
    pos = 0
    while True:
        m = _BOX_OPEN.search(text, pos)
        if m is None:
            return None
        end = _matching_close(text, m.end())
        if end is None:
            return None
        content = text[m.end():end].strip()
        if content:
            return content
        pos = end + 1
