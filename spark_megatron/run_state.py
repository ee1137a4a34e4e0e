"""Everything about a run that outlives one step: the prompt stream and its cursor, the step counter, resume,
checkpoints, the supervised warm-up of the quickstart, the watch on bad updates, and the metrics sinks (files,
TensorBoard, wandb; the console view is metrics.StepConsole)."""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from spark_megatron.config import ConfigError, RunConfig
from spark_megatron.data import DataError, PromptStream, load_prompts
from spark_megatron.data.lengths import filter_by_length
from spark_megatron.metrics import MetricsLogger, StepConsole
from spark_megatron.run_dir import adopts_unmarked_checkpoints, read_run_id

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped itself: too many bad updates in a row. The message names the likely cause and the last
    good checkpoint."""


class RunState:
    def __init__(self, cfg: RunConfig, roles, queue, is_driver: bool):
        self.cfg, self.roles, self.queue, self.is_driver = cfg, roles, queue, is_driver
        # the launching process's preflight loaded the same data and reported what it skipped or dropped
        loaded = load_prompts(cfg.data.train_files, on_bad_record=cfg.data.on_bad_record,
                              image_max_pixels=cfg.data.image_max_pixels,
                              image_min_pixels=cfg.data.image_min_pixels, warn=False)
        # an engine refuses a prompt over the limit, so one such prompt would end the run when drawn: drop
        # them here, where every rank drops the same ones and a resumed run draws from the same list
        lengths = filter_by_length(roles.tokenizer, loaded.prompts, cfg.rollout.max_prompt_tokens)
        if not lengths.kept:
            raise DataError(f"no prompt of {', '.join(cfg.data.train_files)} fits rollout.max_prompt_tokens="
                            f"{cfg.rollout.max_prompt_tokens} ({lengths.summary()})")
        self.prompts = lengths.kept
        self.data_counts = {"data/prompts": float(len(self.prompts)),
                            "data/skipped_records": float(loaded.report.skipped),
                            "data/dropped_long_prompts": float(len(lengths.dropped))}
        self.stream = PromptStream(self.prompts, cfg.data.prompts_per_step, cfg.data.shuffle, cfg.seed,
                                   epochs=None if cfg.total_steps else cfg.data.epochs)
        per_epoch = math.ceil(len(self.prompts) / cfg.data.prompts_per_step)
        self.total_steps = cfg.total_steps or per_epoch * cfg.data.epochs
        self.step = 0
        self.resumed = False
        self.ckpt_root = Path(cfg.output_dir) / "checkpoints"
        self.run_id = read_run_id(cfg.output_dir)
        self._adopt_unmarked = adopts_unmarked_checkpoints(cfg.output_dir)
        self.last_good: Optional[Path] = None
        """Newest checkpoint of this run written while no streak of bad updates was going on."""
        self.logger = None
        self.console = StepConsole(cfg.logging, self.total_steps, enabled=is_driver)

    # ---------------------------------------------------------------------------------------- resume / save
    def maybe_resume(self) -> None:
        latest = self._resume() if self.cfg.checkpoint.resume else None
        # a resume that found no checkpoint starts over: rows of the run that died before it wrote one go
        self.logger = MetricsLogger(self.cfg.logging, self.cfg.output_dir, enabled=self.is_driver,
                                    resume_from_step=self.step if self.cfg.checkpoint.resume else None,
                                    run_id=self.run_id)
        if self.is_driver and self.resumed:
            log.info(f"[resume] continuing after step {self.step} from {latest}")

    def _belongs(self, path: Path) -> bool:
        from spark_megatron.checkpoint.train_state import checkpoint_run_id

        return checkpoint_run_id(path) in ({self.run_id, None} if self._adopt_unmarked else {self.run_id})

    def _resume(self) -> Optional[Path]:
        """Load this run's newest checkpoint that loads, falling back past ones that do not (every rank must
        succeed on the same one); None when the run has none."""
        from spark_megatron.checkpoint.train_state import complete_checkpoints, load_train_state
        from spark_megatron.models.weights import CheckpointError

        candidates = [p for p in reversed(complete_checkpoints(self.ckpt_root)) if self._belongs(p)]
        if not candidates:
            if self.is_driver:
                log.info(f"[resume] no complete checkpoint under {self.ckpt_root}; starting fresh")
            return None
        failures = []
        for i, ckpt in enumerate(candidates):
            reason = None
            try:
                extra = load_train_state(self.roles.actor, ckpt)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - any failure means: try the previous checkpoint
                reason = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
                reason = (reason.splitlines() or [type(e).__name__])[0]
            if _all_ranks_ok(reason is None):
                self._restore(extra, ckpt)
                return ckpt
            reason = reason or "failed on another rank"
            failures.append(f"{ckpt.name}: {reason}")
            if self.is_driver:
                nxt = candidates[i + 1].name if i + 1 < len(candidates) else "none left"
                log.warning(f"[resume] checkpoint {ckpt} does not load ({reason}); falling back to: {nxt}")
        raise CheckpointError(f"no checkpoint under {self.ckpt_root} loads ({'; '.join(failures)})")

    def _restore(self, extra: dict, ckpt: Path) -> None:
        self.step = extra["step"]
        try:
            self.stream.load_state_dict(extra["stream"])
        except ValueError:
            saved = extra["stream"]
            raise ConfigError(f"{ckpt} was written for {saved['num_prompts']} prompts (seed {saved['seed']}); the "
                              f"data now gives {len(self.prompts)} (seed {self.cfg.seed}): data.train_files, "
                              "data.on_bad_record, rollout.max_prompt_tokens or seed changed since") from None
        self.queue.load_state_dict(extra["queue"])
        # fit() starts by pushing the restored weights, which bumps the version: start one below the saved
        # version so that push re-publishes the checkpoint's weights under their own version, as in a run that
        # was never interrupted
        self.roles.policy_version = extra["policy_version"] - 1
        random.setstate(_tuplify(extra["py_random"]))
        updates = extra.get("updates") or {}
        actor = self.roles.actor
        actor.bad_streak = int(updates.get("bad_streak", 0))
        actor.bad_updates.update(updates.get("bad_updates", {}))
        actor.streak_kinds.update(updates.get("streak_kinds", {}))
        self.last_good = ckpt if actor.bad_streak == 0 else None
        self.resumed = True
        self._load_reference()

    def maybe_checkpoint(self, step: int) -> None:
        from spark_megatron.checkpoint.train_state import save_train_state

        every = self.cfg.checkpoint.save_interval
        if not ((every and step % every == 0) or step == self.total_steps):
            return
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        actor = self.roles.actor
        extra = {"step": step, "stream": self.stream.state_dict(), "queue": self.queue.state_dict(),
                 "policy_version": self.roles.policy_version, "py_random": random.getstate(),
                 "run_id": self.run_id, "updates": {"bad_streak": actor.bad_streak, "bad_updates": actor.bad_updates,
                                                    "streak_kinds": actor.streak_kinds}}
        path = save_train_state(actor, self.ckpt_root / f"step_{step:06d}", extra,
                                keep_last=self.cfg.checkpoint.keep_last, belongs=self._belongs,
                                protect=[self.last_good.name] if self.last_good else [])
        if actor.bad_streak == 0:
            self.last_good = path

    # ---------------------------------------------------------------------------------------- bad updates
    def check_updates(self, where: str) -> None:
        """Stop the run once optim.stop_after_bad_updates updates in a row were bad (every rank decides alike:
        the counts come from all-reduced losses and gradient norms)."""
        limit, actor = self.cfg.optim.stop_after_bad_updates, self.roles.actor
        if not limit or actor.bad_streak < limit:
            return
        kinds = actor.streak_kinds
        what = ", ".join(f"{n} {label}" for n, label in (
            (kinds["nonfinite"], "with a non-finite loss, gradient or input (skipped)"),
            (kinds["zero_grad"], "with an exactly zero gradient")) if n)
        lr = f"optim.lr={self.cfg.optim.lr:g}"
        if kinds["nonfinite"] >= kinds["zero_grad"]:
            cause = f"the learning rate is too high ({lr}), or the data gives non-finite values"
        else:
            cause = (f"the policy collapsed (a learning rate too high, {lr}, makes its output uniform), or the "
                     "data gives no reward signal (every group scored alike)")
        good = str(self.last_good) if self.last_good else "none (no checkpoint of this run was written before)"
        raise TrainingStopped(f"stopped at {where}: {actor.bad_streak} bad optimizer updates in a row ({what}); "
                              f"likely cause: {cause}; last good checkpoint: {good}")

    def counters(self) -> dict:
        """Run-level counts logged with every step: data dropped at load, bad updates so far."""
        actor = self.roles.actor
        return {**self.data_counts, "health/nonfinite_updates": float(actor.bad_updates["nonfinite"]),
                "health/zero_grad_updates": float(actor.bad_updates["zero_grad"]),
                "health/bad_streak": float(actor.bad_streak)}

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

        skipped_before = self.roles.actor.bad_updates["nonfinite"]
        stats = supervised_warmup(self.cfg, self.roles, self.prompts, sequences, self.is_driver,
                                  after_update=self.check_updates)
        if self.is_driver:
            skipped = self.roles.actor.bad_updates["nonfinite"] - skipped_before
            log.info(f"[warm-up] {self.cfg.warmup_sft_steps} supervised steps, final loss {stats['loss']:.4f}"
                     + (f", {skipped} updates skipped (non-finite)" if skipped else ""))
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

    def finish(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        self.console.close()
        if self.logger is not None:
            self.logger.close()


def _all_ranks_ok(ok: bool) -> bool:
    """True only when `ok` holds on every rank (a checkpoint counts as loaded only if it loaded everywhere)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    import torch

    from spark_megatron.parallel.cpu_compat import compute_device

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=compute_device())  # NCCL: device tensors only
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _tuplify(x):
    """JSON turns random.getstate()'s tuples into lists; setstate wants tuples back."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
