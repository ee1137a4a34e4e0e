"""Load prompts from data specs, failing fast or skipping bad records with a per-reason report."""
from __future__ import annotations

import collections
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

from spark_megatron.data import synthetic, synthetic_vision
from spark_megatron.data.records import DataError, ImageDefaults, RecordError, parse_record
from spark_megatron.data.sources import iter_records, resolve_source

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5
"""Problems quoted verbatim per source in a report (the rest are only counted)."""


@dataclass
class SourceReport:
    source: str
    total: int = 0
    loaded: int = 0
    skipped: dict = field(default_factory=collections.Counter)
    """reason value -> count."""
    examples: list = field(default_factory=list)
    """The first few problems, as readable strings (file, record index, field, reason, detail)."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass
class LoadReport:
    sources: list = field(default_factory=list)
    """One SourceReport per data spec, in order."""

    @property
    def loaded(self) -> int:
        return sum(s.loaded for s in self.sources)

    @property
    def skipped(self) -> int:
        return sum(s.num_skipped for s in self.sources)

    def summary(self) -> str:
        lines = []
        for s in self.sources:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(s.skipped.items())) or "none"
            lines.append(f"{s.source}: {s.loaded}/{s.total} loaded, skipped: {reasons}")
            lines.extend(f"  {e}" for e in s.examples)
        return "\n".join(lines)


@dataclass
class LoadedPrompts:
    prompts: list
    report: LoadReport


def _load_source(spec: str, on_bad_record: str, defaults: ImageDefaults, out: list) -> SourceReport:
    report = SourceReport(spec)
    makers = {synthetic.PREFIX: synthetic.arith_prompts, synthetic_vision.PREFIX: synthetic_vision.shapes_prompts}
    maker = next((f for prefix, f in makers.items() if spec.startswith(prefix)), None)
    if maker is not None:
        prompts = maker(spec)
        report.total = report.loaded = len(prompts)
        out.extend(prompts)
        return report
    src = resolve_source(spec)
    for raw in iter_records(src):
        report.total += 1
        try:
            if isinstance(raw.value, RecordError):
                raise raw.value
            out.append(parse_record(raw.value, spec, raw.index, src.base_dir, defaults))
            report.loaded += 1
        except RecordError as e:
            problem = dataclasses.replace(e.problem, line=raw.index + 1) if src.kind == "jsonl" else e.problem
            if on_bad_record == "fail":
                raise DataError(f"bad record: {problem} (set data.on_bad_record=skip to skip such records)",
                                problem) from None
            report.skipped[problem.reason.value] += 1
            if len(report.examples) < MAX_EXAMPLES:
                report.examples.append(str(problem))
    return report


def load_prompts(specs: Sequence[str], on_bad_record: str = "fail", image_max_pixels: Optional[int] = None,
                 image_min_pixels: Optional[int] = None, check_images: bool = True,
                 warn: bool = True) -> LoadedPrompts:
    """All prompts of `specs` in order (JSONL, JSON list, `hf:<dir|file>[#split]`, `synthetic:arith[?...]`,
    `synthetic:shapes[?...]`).

    on_bad_record: "fail" raises DataError at the first bad record (message names file, index and field);
    "skip" drops it and counts it per reason in the report, which is also logged (unless `warn` is false: the
    caller reports it). Nothing is dropped silently.
    Image parts without their own max/min_pixels get the given defaults.
    """
    if on_bad_record not in ("fail", "skip"):
        raise DataError(f"on_bad_record must be 'fail' or 'skip', got {on_bad_record!r}")
    if not specs:
        raise DataError("no data files given (data.train_files is empty)")
    defaults = ImageDefaults(image_max_pixels, image_min_pixels, check_images)
    prompts: list = []
    report = LoadReport([_load_source(spec, on_bad_record, defaults, prompts) for spec in specs])
    if report.skipped and warn:
        logger.warning("skipped %d bad records:\n%s", report.skipped, report.summary())
    if not prompts:  # first line stands alone (the CLI prints only it); the full report follows
        reasons = collections.Counter()
        for src in report.sources:
            reasons.update(src.skipped)
        first = next((e for src in report.sources for e in src.examples), None)
        raise DataError(f"no usable records in {', '.join(specs)} ({report.skipped} skipped: "
                        + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items()))
                        + (f"; first: {first}" if first else "") + f")\n{report.summary()}")
    return LoadedPrompts(prompts, report)


def load_from_config(cfg) -> LoadedPrompts:
    """`load_prompts` driven by a `DataConfig`."""
    return load_prompts(cfg.train_files, cfg.on_bad_record, cfg.image_max_pixels, cfg.image_min_pixels)
