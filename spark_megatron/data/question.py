"""Take a policy prompt apart (question text, image parts, system turns) and build new task messages from it."""
from __future__ import annotations

import copy
import re

from spark_megatron.types import Prompt

_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
_BOX_INSTRUCTION = re.compile(r"\\box(?:ed)?\s*\{")


def _user_parts(prompt: Prompt) -> list:
    """All content parts of the user turns, as {type: ...} dicts (string content becomes one text part)."""
    parts = []
    for msg in prompt.messages:
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        parts.extend([{"type": "text", "text": content}] if isinstance(content, str) else content or [])
    return parts


def _drop_box_instruction(text: str) -> str:
    """Remove sentences that ask for a \\boxed{} answer: every new task brings its own output instruction,
    and two conflicting instructions confuse the judge. Line breaks (listed options) are kept."""
    lines = []
    for line in text.split("\n"):
        if _BOX_INSTRUCTION.search(line):
            line = " ".join(s for s in _SENTENCE_END.split(line) if not _BOX_INSTRUCTION.search(s))
        lines.append(line.rstrip())
    kept = "\n".join(lines).strip()
    return kept or text.strip()


def question_text(prompt: Prompt) -> str:
    """The question as the user wrote it: text parts of the user turns, without the \\boxed{} instruction."""
    text = "\n".join(p["text"] for p in _user_parts(prompt) if p.get("type") == "text" and p.get("text"))
    return _drop_box_instruction(text)


def image_parts(prompt: Prompt) -> list:
    """The image parts of the user turns, in order (copies; their placeholders travel with new tasks)."""
    return [copy.deepcopy(p) for p in _user_parts(prompt) if p.get("type") == "image"]


def has_images(prompt: Prompt) -> bool:
    return bool(prompt.images) or bool(image_parts(prompt))


def task_messages(prompt: Prompt, text: str) -> list:
    """Messages for a new task about `prompt`: its system turns, then one user turn with its images + `text`.

    Text-only prompts get string content, which every chat template accepts.
    """
    system = [copy.deepcopy(m) for m in prompt.messages if m.get("role") == "system"]
    images = image_parts(prompt)
    content = images + [{"type": "text", "text": text}] if images else text
    return system + [{"role": "user", "content": content}]
