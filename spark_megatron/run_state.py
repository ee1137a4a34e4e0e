"""Everything about a run that outlives one step: the prompt stream and its cursor, the step counter, resume,
checkpoints, the supervised warm-up of the quickstart, metrics and the progress bar."""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch.distributed as dist

from spark_megatron.config import RunConfig
from spark_megatron.data import PromptStream, load_prompts
from spark_megatron.metrics import MetricsLogger


class RunState:
    def __init__(self, cfg: RunConfig, roles, queue, is_driver: bool):
        self.cfg, self.roles, self.queue, self.is_driver = cfg, roles, queue, is_driver
        loaded = load_prompts(cfg.data.train_files, on_bad_record=cfg.data.on_bad_record,
                              image_max_pixels=cfg.data.image_max_pixels, image_min_pixels=cfg.data.image_min_pixels)
        if is_driver and loaded.report.skipped:
            print(loaded.report.summary())
        self.prompts = loaded.prompts
        self.stream = PromptStream(self.prompts, cfg.data.prompts_per_step, cfg.data.shuffle, cfg.seed,
                                   epochs=None if cfg.total_steps else cfg.data.epochs)
        per_epoch = math.ceil(len(self.prompts) / cfg.data.prompts_per_step)
        self.total_steps = cfg.total_steps or per_epoch * cfg.data.epochs
        self.step = 0
        self.resumed = False
        self.ckpt_root = Path(cfg.output_dir) / "checkpoints"
        self.logger = None
        self._bar = None

    # ---------------------------------------------------------------------------------------- resume / save
    def maybe_resume(self) -> None:
        from spark_megatron.checkpoint.train_state import find_latest_complete, load_train_state

        latest = find_latest_complete(self.ckpt_root) if self.cfg.checkpoint.resume else None
        if latest is not None:
            extra = load_train_state(self.roles.actor, latest)
            self.step = extra["step"]
            self.stream.load_state_dict(extra["stream"])
            self.queue.load_state_dict(extra["queue"])
            self.roles.policy_version = extra["policy_version"]
            random.setstate(_tuplify(extra["py_random"]))
            self.resumed = True
            self._load_reference()
        elif self.cfg.checkpoint.resume and self.is_driver:
            print(f"[resume] no complete checkpoint under {self.ckpt_root}; starting fresh")
        self.logger = MetricsLogger(self.cfg.logging, self.cfg.output_dir, enabled=self.is_driver,
                                    resume_from_step=self.step if self.resumed else None)
        if self.is_driver and self.resumed:
            print(f"[resume] continuing after step {self.step} from {latest}")

    def maybe_checkpoint(self, step: int) -> None:
        from spark_megatron.checkpoint.train_state import save_train_state

        every = self.cfg.checkpoint.save_interval
        if not ((every and step % every == 0) or step == self.total_steps):
            return
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        extra = {"step": step, "stream": self.stream.state_dict(), "queue": self.queue.state_dict(),
                 "policy_version": self.roles.policy_version, "py_random": random.getstate()}
        save_train_state(self.roles.actor, self.ckpt_root / f"step_{step:06d}", extra,
                         keep_last=self.cfg.checkpoint.keep_last)

    # ---------------------------------------------------------------------------------------- loop
    def batches(self):
        while self.step < self.total_steps:
            batch = self.stream.next_batch()
            if batch is None:
                return
            self.step += 1
            yield self.step, batch

    def maybe_warmup(self, sequences) -> None:
        if self.resumed or self.cfg.warmup_sft_steps <= 0:
            return
        from spark_megatron.warmup import supervised_warmup

        stats = supervised_warmup(self.cfg, self.roles, self.prompts, sequences, self.is_driver)
        if self.is_driver:
            print(f"[warm-up] {self.cfg.warmup_sft_steps} supervised steps, final loss {stats['loss']:.4f}")
        from spark_megatron.checkpoint.train_state import save_model_snapshot

        save_model_snapshot(self.roles.actor, self.warmup_model)
        self._load_reference()

    @property
    def warmup_model(self) -> Path:
        return Path(self.cfg.output_dir) / "warmup_model"  # beside checkpoints/: never pruned or resumed from

    def _load_reference(self) -> None:
        """RL starts from the warmed-up model, so the KL reference is that model (not the random init); a
        resumed run reloads it from the snapshot written after the warm-up."""
        if self.roles.reference is None or not self.warmup_model.is_dir():
            return
        from spark_megatron.checkpoint.megatron_format import load_megatron_checkpoint

        load_megatron_checkpoint(self.roles.reference.model_chunks[0], self.warmup_model)

    def progress(self, step: int, row: dict) -> None:
        if not (self.is_driver and self.cfg.logging.progress):
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=step - 1, desc="SPARK", unit="step")
        self._bar.update(1)
        show = {"pol": row.get("policy/accuracy"), "judge": row.get("judge/accuracy"),
                "s/step": row.get("time/step_s")}
        self._bar.set_postfix({k: f"{v:.3f}" for k, v in show.items() if isinstance(v, (int, float))})

    def finish(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.logger is not None:
            self.logger.close()


def _tuplify(x):
    """JSON turns random.getstate()'s tuples into lists; setstate wants tuples back."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
