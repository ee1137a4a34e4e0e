"""Per-step metrics: JSONL (always), TensorBoard and wandb (offline by default), on rank 0 only.

`metrics.jsonl` is the source of truth: one JSON object per step, appended and flushed, so a killed run keeps
every completed step and a resumed run continues the same file (steps past the resume point are dropped first,
so the file never holds two versions of one step). TensorBoard continues the same log directory with a purge at
the resume point (TensorBoard then shows the redone steps, not the killed run's). wandb continues the same run
(its id is the run id of output_dir/run.json); its history cannot be rewound, so steps it may already hold (up to
the last step the killed run wrote) are not sent again: wandb keeps the first values of redone steps.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from spark_megatron.config import LoggingConfig


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Writes metrics of each step to JSONL, TensorBoard and wandb; a no-op on ranks other than 0."""

    def __init__(self, cfg: LoggingConfig, output_dir, run_config: Optional[dict] = None, enabled: bool = True,
                 resume_from_step: Optional[int] = None, run_id: Optional[str] = None):
        """`resume_from_step`: continue a run whose steps up to this one are kept (0: a resumed run that found
        no checkpoint starts over); `run_id` names the wandb run, so a resume continues it."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        self._wandb_after = 0
        """wandb gets only steps above this one (those below were sent before a resume)."""
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is not None:
            self._wandb_after = self._truncate_after(resume_from_step)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_from_step + 1 if resume_from_step is not None else None
                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is a declared dependency; degrade rather than die mid-run
                self._tb = None
        if cfg.wandb_project:
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
            self._wandb = wandb.init(project=cfg.wandb_project, dir=str(output_dir), config=run_config or {},
                                     mode=cfg.wandb_mode, id=run_id, resume="allow")

    def _truncate_after(self, step: int) -> int:
        """Drop rows past `step`; returns the highest step the file held (what other sinks may have seen)."""
        if not self.path.exists():
            return step
        keep, highest = [], step
        for line in self.path.read_text().splitlines():
            try:
                row_step = json.loads(line).get("step", 0)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            highest = max(highest, row_step)
            if row_step <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)
        return highest

    def log(self, step: int, metrics: dict) -> dict:
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        if not self.enabled:
            return row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None and step > self._wandb_after:
            self._wandb.log(numeric, step=step)
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path) -> list:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
