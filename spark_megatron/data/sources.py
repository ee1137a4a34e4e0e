"""Where raw records come from: JSONL, JSON (a list), Hugging Face `datasets` (saved dirs or local files)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from spark_megatron.data.records import BadReason, DataError, RecordError, RecordProblem

HF_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
"""Local file extensions read through `datasets.load_dataset(<builder>, data_files=...)`."""


@dataclass(frozen=True)
class RawRecord:
    index: int
    value: Any
    """The decoded record, or a RecordError for a line that could not be decoded."""


@dataclass(frozen=True)
class Source:
    """A parsed data spec: `path.jsonl`, `path.json`, `hf:<dir or file>[#split]`, `x.parquet`."""

    spec: str
    kind: str
    """jsonl | json | hf_dir | hf_file"""
    path: str
    split: str = "train"

    @property
    def base_dir(self) -> str:
        return self.path if self.kind == "hf_dir" else os.path.dirname(os.path.abspath(self.path))


def resolve_source(spec: str) -> Source:
    """Classify a data spec; raises DataError for a missing path or an unknown format."""
    body, split = spec, "train"
    if spec.startswith("hf:"):
        body = spec[3:]
        if "#" in body:
            body, split = body.rsplit("#", 1)
    if not os.path.exists(body):
        raise DataError(f"{spec}: no such file or directory")
    ext = os.path.splitext(body)[1].lower()
    if os.path.isdir(body):
        return Source(spec, "hf_dir", body, split)
    if ext in HF_FILE_BUILDERS:
        return Source(spec, "hf_file", body, split)
    if spec.startswith("hf:") and ext == ".json":
        return Source(spec, "hf_file", body, split)
    if ext in (".jsonl", ".ndjson"):
        return Source(spec, "jsonl", body)
    if ext == ".json":
        return Source(spec, "json", body)
    raise DataError(f"{spec}: unknown data format '{ext}' (expected .jsonl, .json, .parquet, .arrow, .csv, "
                    "an `hf:` dataset directory, synthetic:arith or synthetic:shapes)")


def _iter_jsonl(src: Source) -> Iterator[RawRecord]:
    # bytes, decoded line by line: one bad byte is one bad record (named by its line), not a dead reader
    with open(src.path, "rb") as f:
        for index, raw in enumerate(f):  # index = 0-based line number, so a report points at the line
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = RecordProblem(src.spec, index, "<record>", BadReason.UNDECODABLE_LINE,
                                        f"line {index + 1} is not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                        f"{e.start + 1})")
                yield RawRecord(index, RecordError(problem))
                continue
            if not line.strip():
                continue
            try:
                yield RawRecord(index, json.loads(line))
            except json.JSONDecodeError as e:
                problem = RecordProblem(src.spec, index, "<record>", BadReason.UNPARSEABLE_RECORD,
                                        f"line {index + 1} is not JSON ({e.msg})")
                yield RawRecord(index, RecordError(problem))


def _iter_json(src: Source) -> Iterator[RawRecord]:
    try:
        with open(src.path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{src.spec}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:  # one JSON document: nothing to skip, the file as a whole is unreadable
        raise DataError(f"{src.spec}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    if not isinstance(data, list):
        raise DataError(f"{src.spec}: a .json data file must hold a list of records, got {type(data).__name__}")
    for index, rec in enumerate(data):
        yield RawRecord(index, rec)


def _load_hf(src: Source):
    try:
        import datasets  # optional dependency: only HF sources need it
    except ImportError:
        raise DataError(f"{src.spec}: reading Hugging Face datasets needs `pip install datasets`") from None
    if src.kind == "hf_dir":
        ds = datasets.load_from_disk(src.path)
    else:
        builder = HF_FILE_BUILDERS.get(os.path.splitext(src.path)[1].lower(), "json")
        ds = datasets.load_dataset(builder, data_files=src.path)
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise DataError(f"{src.spec}: no split '{src.split}' (have: {', '.join(ds)})")
        ds = ds[src.split]
    return ds


def _iter_hf(src: Source) -> Iterator[RawRecord]:
    for index, rec in enumerate(_load_hf(src)):
        yield RawRecord(index, rec)


def iter_records(src: Source) -> Iterator[RawRecord]:
    """Raw records of a source in file order."""
    readers = {"jsonl": _iter_jsonl, "json": _iter_json, "hf_dir": _iter_hf, "hf_file": _iter_hf}
    return readers[src.kind](src)
