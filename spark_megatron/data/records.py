"""One Spark-Data record -> a typed `Prompt`, or a precise description of what is wrong with it.

Record: {"message": "<JSON string of chat messages>", "answer": "<ground truth>"}; a user message's content is a
string or a list of parts {type: text, text} / {type: image, image: path, max_pixels?, min_pixels?}.
"""
from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from spark_megatron.types import ImageRef, Prompt


class BadReason(str, enum.Enum):
    """Why a record was rejected (the skip report counts per reason)."""

    UNPARSEABLE_RECORD = "unparseable_record"
    """A JSONL line that is not JSON, or a record that is not an object."""
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    UNPARSEABLE_MESSAGE = "unparseable_message"
    """`message` is not valid JSON or not a well-formed list of chat messages."""
    EMPTY_ANSWER = "empty_answer"
    MISSING_IMAGE = "missing_image"
    BAD_IMAGE = "bad_image"
    """The image file exists but does not decode (empty, truncated, not an image)."""
    UNDECODABLE_LINE = "undecodable_line"
    """A JSONL line that is not valid UTF-8."""


MAX_ASPECT_RATIO = 200
"""Longest/shortest side beyond which the Qwen2.5-VL sizing rule refuses an image (vision.images.smart_resize)."""


@dataclass(frozen=True)
class RecordProblem:
    source: str
    index: int
    field: str
    reason: BadReason
    detail: str
    line: Optional[int] = None
    """1-based line of a JSONL record (None for other sources)."""

    def __str__(self) -> str:
        where = f"record {self.index}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{self.source}: {where}: field '{self.field}': {self.reason.value}: {self.detail}"


class DataError(ValueError):
    """Bad input data; `problem` locates it (file, record index, field) when it concerns one record."""

    def __init__(self, message: str, problem: Optional[RecordProblem] = None):
        super().__init__(message)
        self.problem = problem


class RecordError(Exception):
    """Internal: raised while parsing one record, carries the problem."""

    def __init__(self, problem: RecordProblem):
        super().__init__(str(problem))
        self.problem = problem


@dataclass(frozen=True)
class ImageDefaults:
    max_pixels: Optional[int] = None
    min_pixels: Optional[int] = None
    check_exists: bool = True
    """Local images must exist and decode (PIL's structural check, no full decode)."""


class _RecordParser:
    def __init__(self, source: str, index: int, base_dir: str, defaults: ImageDefaults):
        self.source, self.index, self.base_dir, self.defaults = source, index, base_dir, defaults
        self.images: list = []

    def fail(self, field: str, reason: BadReason, detail: str):
        raise RecordError(RecordProblem(self.source, self.index, field, reason, detail))

    def messages(self, raw: Any) -> list:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                self.fail("message", BadReason.UNPARSEABLE_MESSAGE, f"invalid JSON ({e.msg} at char {e.pos})")
        elif not isinstance(raw, list):  # HF datasets may hold the decoded list already
            self.fail("message", BadReason.WRONG_TYPE, f"expected a JSON string, got {type(raw).__name__}")
        if not isinstance(raw, list) or not raw:
            self.fail("message", BadReason.UNPARSEABLE_MESSAGE, "expected a non-empty list of chat messages")
        return [self.message(i, m) for i, m in enumerate(raw)]

    def message(self, i: int, msg: Any) -> dict:
        where = f"message[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            self.fail(where, BadReason.UNPARSEABLE_MESSAGE, "each message needs a string 'role'")
        content = msg.get("content")
        if isinstance(content, str):
            return {"role": msg["role"], "content": content}
        if not isinstance(content, list):
            self.fail(f"{where}.content", BadReason.UNPARSEABLE_MESSAGE, "content must be a string or a list of parts")
        return {"role": msg["role"], "content": [self.part(f"{where}.content[{j}]", p) for j, p in enumerate(content)]}

    def part(self, where: str, part: Any) -> dict:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            return dict(part)
        if kind == "image" and isinstance(part.get("image"), str):
            return self.image(where, part)
        self.fail(where, BadReason.UNPARSEABLE_MESSAGE, "expected {type: text, text: str} or {type: image, image: str}")

    def image(self, where: str, part: dict) -> dict:
        path = part["image"]
        if path.startswith("file://"):
            path = path[len("file://"):]
        remote = path.startswith(("http://", "https://", "data:"))
        if not remote:
            path = os.path.normpath(os.path.join(self.base_dir, path))
            if self.defaults.check_exists and not os.path.isfile(path):
                self.fail(f"{where}.image", BadReason.MISSING_IMAGE, f"no such file: {path}")
            why = image_problem(path) if self.defaults.check_exists else None
            if why:
                self.fail(f"{where}.image", BadReason.BAD_IMAGE, f"{path}: {why}")
        sizes = {}
        for key in ("max_pixels", "min_pixels"):
            value = part.get(key, getattr(self.defaults, key))
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                self.fail(f"{where}.{key}", BadReason.WRONG_TYPE, f"expected a number, got {value!r}")
            sizes[key] = int(value) if value is not None else None
        self.images.append(ImageRef(path=path, **sizes))
        return {**part, "image": path, **{k: v for k, v in sizes.items() if v is not None}}

    def answer(self, raw: Any) -> str:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            self.fail("answer", BadReason.WRONG_TYPE, f"expected a string, got {type(raw).__name__}")
        text = str(raw).strip()
        if not text:
            self.fail("answer", BadReason.EMPTY_ANSWER, "empty ground truth")
        return text


def image_problem(path: str) -> Optional[str]:
    """Why the image file at `path` cannot be used (None when it opens and passes PIL's integrity check: header,
    chunk structure and, for PNG, the checksums; a zero-byte, truncated or garbled file fails)."""
    from PIL import Image, UnidentifiedImageError

    if os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as im:
            width, height = im.size
            im.verify()
    except UnidentifiedImageError:
        return "not a readable image"
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ... for broken files
        return f"does not decode ({type(e).__name__}: {str(e)[:120]})"
    if min(width, height) <= 0:
        return f"zero-size image ({width}x{height})"
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return f"aspect ratio {max(width, height) / min(width, height):.0f} exceeds {MAX_ASPECT_RATIO}"
    return None


def parse_record(raw: Any, source: str, index: int, base_dir: str = ".",
                 defaults: ImageDefaults = ImageDefaults()) -> Prompt:
    """Build the Prompt of record `index` of `source`; raises RecordError describing the first problem.

    Relative image paths resolve against `base_dir` (the data file's directory). uid = `<source>:<index>`.
    """
    p = _RecordParser(source, index, base_dir, defaults)
    if not isinstance(raw, dict):
        p.fail("<record>", BadReason.UNPARSEABLE_RECORD, f"expected an object, got {type(raw).__name__}")
    for name in ("message", "answer"):
        if raw.get(name) is None:
            p.fail(name, BadReason.MISSING_FIELD, f"record has no '{name}'")
    answer = p.answer(raw["answer"])
    messages = p.messages(raw["message"])
    return Prompt(uid=f"{source}:{index}", messages=messages, ground_truth=answer, images=p.images)
