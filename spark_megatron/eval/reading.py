"""Read one suite dataset into items: raw records from the local file, the dataset's converter, subset filter and
limit; bad records are named (file, index, field) and skipped with per-reason counts (or fail the run)."""
from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from spark_megatron.config import ConfigError
from spark_megatron.data.records import DataError
from spark_megatron.data.sources import RawRecord, Source, iter_records, resolve_source
from spark_megatron.eval.formats import FORMATS
from spark_megatron.eval.items import AnswerItem
from spark_megatron.eval.records import BadRecord, RecordContext

MAX_EXAMPLES = 5


@dataclass
class DatasetReport:
    """What reading a dataset found (goes into summary.json and the console)."""

    records: int = 0
    usable: int = 0
    skipped: dict = field(default_factory=collections.Counter)
    """reason -> count."""
    examples: list = field(default_factory=list)
    """The first few bad records, each naming file, record index and field."""
    filtered: int = 0
    """Usable records left out by the dataset's subset filter or limit."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {"records": self.records, "usable": self.usable, "skipped": dict(self.skipped),
                "skipped_examples": list(self.examples), "filtered": self.filtered}


@dataclass
class LoadedDataset:
    items: list
    report: DatasetReport


def _json_records(path: str) -> Iterator[RawRecord]:
    """A .json file: a list of records, or an object of records keyed by id (LogicVista's dataset.json)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, list):
        yield from (RawRecord(i, rec) for i, rec in enumerate(data))
    elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        yield from (RawRecord(i, {"_key": k, **v}) for i, (k, v) in enumerate(data.items()))
    else:
        raise DataError(f"{path}: a .json dataset must hold a list of records or an object of records")


def raw_records(path: str, split: Optional[str]) -> Iterator[RawRecord]:
    if path.endswith(".json") and os.path.isfile(path):
        return _json_records(path)
    src = resolve_source(path)
    if src.kind == "hf_dir":
        src = Source(src.spec, src.kind, src.path, split or _default_split(src.path))
    return iter_records(src)


def _default_split(path: str) -> str:
    """The only split of a saved DatasetDict, else 'test'."""
    info = Path(path) / "dataset_dict.json"
    if info.is_file():
        splits = json.loads(info.read_text()).get("splits", [])
        if len(splits) == 1:
            return splits[0]
    return "test"


def _synthetic(spec, suite) -> LoadedDataset:
    """`synthetic:arith?...` / `synthetic:shapes?...` paths: the training's built-in tasks as answer items."""
    from spark_megatron.data.loading import load_prompts

    prompts = load_prompts([spec.path]).prompts
    items = [AnswerItem(p.uid.rsplit(":", 1)[-1], p) for p in prompts]
    return LoadedDataset(items, DatasetReport(records=len(items), usable=len(items)))


def load_dataset(spec, suite, image_cache: Optional[str] = None) -> LoadedDataset:
    """All usable items of one DatasetSpec, in file order (subset filter, then limit)."""
    if spec.path.startswith("synthetic:"):
        if spec.format != "spark" or spec.kind != "answer":
            raise ConfigError(f"dataset '{spec.name}': synthetic paths are format spark, kind answer")
        loaded = _synthetic(spec, suite)
        return _select(loaded.items, spec, loaded.report)
    if not os.path.exists(spec.path):
        raise ConfigError(f"dataset '{spec.name}': {spec.path}: no such file or directory")
    fmt = FORMATS[spec.format]
    instruction = suite.instruction if spec.instruction is None else spec.instruction
    base = spec.image_root or (spec.path if os.path.isdir(spec.path) else os.path.dirname(os.path.abspath(spec.path)))
    report, items = DatasetReport(), []
    jsonl = spec.path.lower().endswith((".jsonl", ".ndjson"))
    for raw in raw_records(spec.path, spec.split):
        report.records += 1
        ctx = RecordContext(spec.path, raw.index, base, suite.system_prompt,
                            instruction if fmt.uses_instruction else "", image_cache,
                            key=raw.value.pop("_key", None) if isinstance(raw.value, dict) else None,
                            line=raw.index + 1 if jsonl else None)
        try:
            if not isinstance(raw.value, dict):
                detail = raw.value.problem.detail if hasattr(raw.value, "problem") else type(raw.value).__name__
                ctx.fail("<record>", "unparseable_record", detail)
            items.append(fmt.convert(raw.value, ctx, spec.kind))
            report.usable += 1
        except BadRecord as e:
            if suite.on_bad_record == "fail":
                raise DataError(f"bad record: {e} (set on_bad_record=skip to skip such records)") from None
            report.skipped[e.reason] += 1
            if len(report.examples) < MAX_EXAMPLES:
                report.examples.append(str(e))
    return _select(items, spec, report)


def _select(items: list, spec, report: DatasetReport) -> LoadedDataset:
    kept = [it for it in items if spec.subset is None or str(it.subset) == spec.subset]
    if spec.limit:
        kept = kept[:spec.limit]
    report.filtered = len(items) - len(kept)
    ids = [it.id for it in kept]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"dataset '{spec.name}': item id '{dup}' appears twice (ids must be unique to resume)")
    if not kept:
        raise DataError(f"dataset '{spec.name}' ({spec.path}): no usable items "
                        f"({report.records} records, {report.num_skipped} bad, subset {spec.subset!r})")
    return LoadedDataset(kept, report)
