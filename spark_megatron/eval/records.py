"""Tools every benchmark converter uses on one raw record: field access that names what is wrong, images from
paths or embedded bytes, and the chat messages of a question."""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from spark_megatron.types import ImageRef, Prompt

LETTERS = "ABCDEFGHIJ"


class BadRecord(Exception):
    """One unusable record: where (file, index, field), why (a short reason) and a detail."""

    def __init__(self, source: str, index: int, field: str, reason: str, detail: str, line: Optional[int] = None):
        where = f"record {index}" + (f" (line {line})" if line is not None else "")
        super().__init__(f"{source}: {where}: field '{field}': {reason}: {detail}")
        self.source, self.index, self.field, self.reason, self.detail = source, index, field, reason, detail


@dataclass
class RecordContext:
    """What a converter knows besides the record: where it came from and how prompts are phrased."""

    source: str
    """The data file (as named in reports)."""
    index: int
    """0-based record index in the file (line number for JSONL)."""
    image_root: str
    """Directory relative image paths resolve against."""
    system_prompt: str = ""
    instruction: str = ""
    image_cache: Optional[str] = None
    """Where images embedded as bytes are written (content-addressed); None = embedded images are refused."""
    key: Optional[str] = None
    """The record's key when the file is a JSON object of records (LogicVista)."""
    line: Optional[int] = None
    """1-based line of a JSONL record (named in reports)."""

    # ------------------------------------------------------------------------------------------ failures
    def fail(self, field: str, reason: str, detail: str):
        raise BadRecord(self.source, self.index, field, reason, detail, self.line)

    def get(self, raw: dict, field: str, kinds=(str,), required: bool = True, default=None) -> Any:
        """raw[field] checked against `kinds`; missing/None -> default, or a bad record when required."""
        value = raw.get(field) if isinstance(raw, dict) else None
        if value is None:
            if required:
                self.fail(field, "missing_field", "record has no value for it")
            return default
        if kinds and not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            want = "/".join(k.__name__ for k in kinds)
            self.fail(field, "wrong_type", f"expected {want}, got {type(value).__name__}")
        return value

    def text(self, raw: dict, field: str, required: bool = True) -> Optional[str]:
        """A non-empty string field (numbers are accepted and printed: answers are often stored as numbers)."""
        value = self.get(raw, field, (str, int, float), required)
        if value is None:
            return None
        text = format_number(value) if isinstance(value, (int, float)) else value.strip()
        if not text and required:
            self.fail(field, "empty_value", "empty string")
        return text or None

    def record_id(self, raw: dict, *fields: str) -> str:
        for f in fields:
            value = raw.get(f) if isinstance(raw, dict) else None
            if value is not None and str(value).strip():
                return str(value).strip()
        return self.key or str(self.index)

    # ------------------------------------------------------------------------------------------ images
    def image(self, raw: dict, *fields: str) -> ImageRef:
        """The record's image from the first usable of `fields`: a local path (relative to image_root), an HF
        Image dict ({'bytes', 'path'}) or a PIL image; embedded bytes are written once to the image cache."""
        tried = []
        for f in fields:
            value = raw.get(f) if isinstance(raw, dict) else None
            if value is None:
                continue
            ref = self._image_value(value, f, tried)
            if ref is not None:
                return ref
        self.fail(fields[0], "missing_image", "; ".join(tried) if tried else "record has no image")

    def _image_value(self, value: Any, field: str, tried: list) -> Optional[ImageRef]:
        if isinstance(value, str):
            path = self._resolve(value)
            if os.path.isfile(path):
                return self._checked(path, field)
            tried.append(f"{field}: no such file {path}")
            return None
        if isinstance(value, dict):
            if value.get("path") and os.path.isfile(self._resolve(value["path"])):
                return self._checked(self._resolve(value["path"]), field)
            if value.get("bytes"):
                return self._cached(bytes(value["bytes"]), field)
            tried.append(f"{field}: neither a readable path nor bytes")
            return None
        if hasattr(value, "save"):  # a PIL image decoded by `datasets`
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return self._cached(buf.getvalue(), field)
        tried.append(f"{field}: unsupported image value {type(value).__name__}")
        return None

    def _resolve(self, path: str) -> str:
        if path.startswith("file://"):
            path = path[len("file://"):]
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.image_root, path))

    def _checked(self, path: str, field: str) -> ImageRef:
        """The training reader's image check: a file that does not decode is a bad record, not a crash later."""
        from spark_megatron.data.records import image_problem

        why = image_problem(path)
        if why:
            self.fail(field, "bad_image", f"{path}: {why}")
        return ImageRef(path)

    def _cached(self, data: bytes, field: str) -> ImageRef:
        if not self.image_cache:
            self.fail(field, "missing_image", "embedded image bytes but no image cache directory")
        digest = hashlib.sha1(data).hexdigest()
        path = Path(self.image_cache) / digest[:2] / f"{digest}.img"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return self._checked(str(path), field)

    # ------------------------------------------------------------------------------------------ prompts
    def prompt(self, item_id: str, question: str, answer: str, images: tuple = (), instruction: bool = True) -> Prompt:
        """System turn + one user turn (images first, then the question and the instruction)."""
        text = question.strip()
        if instruction and self.instruction:
            text = f"{text}\n{self.instruction}"
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        if images:
            parts = [{"type": "image", "image": im.path} for im in images] + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": parts})
        else:
            messages.append({"role": "user", "content": text})
        return Prompt(uid=f"{self.source}:{item_id}", messages=messages, ground_truth=answer, images=list(images))


def format_number(value) -> str:
    """42.0 -> '42' (AMC stores integers as floats), 0.5 -> '0.5'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def letter_of(options: list, answer: str) -> Optional[str]:
    """The letter (A, B, ...) of `answer` among `options`, by exact then whitespace/case-insensitive match."""
    for i, opt in enumerate(options):
        if str(opt).strip() == answer.strip():
            return LETTERS[i]
    norm = " ".join(answer.split()).lower()
    for i, opt in enumerate(options):
        if " ".join(str(opt).split()).lower() == norm:
            return LETTERS[i]
    return None


def options_block(options: list, header: str = "Choices:") -> str:
    """"Choices:\\n(A) x\\n(B) y": the layout MathVista's own query uses."""
    return "\n".join([header] + [f"({LETTERS[i]}) {str(o).strip()}" for i, o in enumerate(options)])
