"""Per-step metrics: JSONL (always), TensorBoard and wandb (offline by default), on rank 0 only.

`metrics.jsonl` is the source of truth: one JSON object per step, appended and flushed, so a killed run keeps
every completed step and a resumed run continues the same file (steps past the resume point are dropped first,
so the file never holds two versions of one step). TensorBoard continues the same log directory with a purge at
the resume point (TensorBoard then shows the redone steps, not the killed run's). wandb continues the same run
(its id is the run id of output_dir/run.json); its history cannot be rewound, so steps it may already hold (up to
the last step the killed run wrote) are not sent again: wandb keeps the first values of redone steps.

`StepConsole` is what rank 0's console shows of the steps: a progress bar and, every `logging.summary_interval`
steps, one line with the means of the headline metrics since the last such line.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

from spark_megatron.config import LoggingConfig

log = logging.getLogger(__name__)


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
            os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")  # no LLM-call tracing (and no advert for it)
            # silent: wandb's banner and end-of-run tables would fill the console; one line says where it writes
            self._wandb = wandb.init(project=cfg.wandb_project, dir=str(output_dir), config=run_config or {},
                                     mode=cfg.wandb_mode, id=run_id, resume="allow",
                                     settings=wandb.Settings(silent=True))
            log.info("wandb: %s run %s under %s", cfg.wandb_mode, self._wandb.id, Path(output_dir) / "wandb")

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


SUMMARY = (("policy/accuracy", "policy acc", ".3f"), ("judge/accuracy", "judge acc", ".3f"),
           ("policy/loss", "loss", ".3g"), ("policy/kl", "kl", ".3g"), ("time/step_s", "s/step", ".1f"))
"""(metric, label, format) of the summary line, in order; a metric no step of the window has is left out."""


class StepConsole:
    """Rank 0's console view of the steps: a tqdm bar (headline values as its postfix) and a summary line every
    `summary_interval` steps and after the last one. Disabled: does nothing."""

    def __init__(self, cfg: LoggingConfig, total_steps: int, enabled: bool = True):
        self.cfg, self.total_steps, self.enabled = cfg, total_steps, enabled
        self._bar = None
        self._window: list = []

    def step(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        if self.cfg.progress:
            self._advance(step, row)
        self._window.append(row)
        every = self.cfg.summary_interval
        if every and (step % every == 0 or step == self.total_steps):
            log.info(summary_line(self._window, step, self.total_steps))
            self._window = []

    def _advance(self, step: int, row: dict) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=step - 1, desc="SPARK", unit="step")
        self._bar.update(1)
        show = {"pol": row.get("policy/accuracy"), "judge": row.get("judge/accuracy"),
                "s/step": row.get("time/step_s")}
        self._bar.set_postfix({k: f"{v:.3f}" for k, v in show.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def summary_line(rows: list, step: int, total: int) -> str:
    """`step 10/50 (steps 1-10): policy acc 0.281, judge acc 0.500, ...`: each value the mean over `rows`."""
    first = rows[0].get("step", step) if rows else step
    parts = []
    for key, label, fmt in SUMMARY:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            parts.append(f"{label} {format(sum(values) / len(values), fmt)}")
    span = f"step {first}" if first == step else f"steps {first}-{step}"
    return f"step {step}/{total} ({span}): " + ", ".join(parts)


def read_metrics(path) -> list:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
