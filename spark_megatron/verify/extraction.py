"""Final-answer extraction: the contents of brace-matched ``\\boxed{...}`` (or ``\\box{...}``) groups."""
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


def extract_boxes(text: Optional[str]) -> list:
    """Contents of every non-empty, brace-matched outermost ``\\boxed{...}`` in `text`, stripped, in order.

    An empty ``\\boxed{}`` is skipped rather than taken as an answer: responses often echo the instruction
    "put the final answer in \\boxed{}" before answering. An unclosed box ends the search: everything after it
    is inside the box, so no later box can be a well-formed final answer. A box inside a box is part of the
    outer one's content, not a separate answer.
    """
    if not text:
        return []
    out, pos = [], 0
    while True:
        m = _BOX_OPEN.search(text, pos)
        if m is None:
            return out
        end = _matching_close(text, m.end())
        if end is None:
            return out
        content = text[m.end():end].strip()
        if content:
            out.append(content)
        pos = end + 1


def extract_boxed(text: Optional[str]) -> Optional[str]:
    """Content of the first non-empty, brace-matched ``\\boxed{...}`` in `text`, stripped; None if there is none
    (see `extract_boxes` for what counts). This is the answer a judge or a reader is shown; the verifier checks
    every box (a response that boxes two different answers is wrong)."""
    if not text:
        return None
    m = _BOX_OPEN.search(text)
    while m is not None:
        end = _matching_close(text, m.end())
        if end is None:
            return None
        content = text[m.end():end].strip()
        if content:
            return content
        m = _BOX_OPEN.search(text, end + 1)
    return None
