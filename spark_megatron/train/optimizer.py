"""Megatron optimizer (Adam, optionally the DistributedOptimizer) and its cosine LR schedule for the actor.

`step_optimizer` replaces megatron's `optimizer.step()`: megatron only detects non-finite gradients through the
fp16 loss scaler, so in fp32 / bf16 a NaN gradient would reach Adam (or turn the clip coefficient into NaN). Here
the all-reduced gradient norm is checked first and the update is skipped on every rank alike when it is not
finite.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

_DTYPE_FLAGS = {"float32": (False, False), "bfloat16": (True, False), "float16": (False, True)}


@dataclass
class LRSchedule:
    """Cosine decay from max_lr to min_lr after a linear warmup, in optimizer steps."""

    max_lr: float
    min_lr: float
    warmup_steps: int
    """Linear warmup from 0 to max_lr over these steps (round(warmup_ratio * total_steps))."""
    decay_steps: int
    """Step at which the cosine reaches min_lr (= total optimizer steps, at least warmup + 1)."""


@dataclass
class StepResult:
    """Outcome of one optimizer step (identical on every rank)."""

    updated: bool
    """False when the step was skipped (non-finite gradients or fp16 overflow)."""
    grad_norm: float
    """Global L2 norm of the gradients before clipping (nan / inf when skipped for that reason)."""


def lr_schedule(optim_cfg, total_steps: int) -> LRSchedule:
    """The schedule for `total_steps` optimizer steps from an OptimConfig (lr, min_lr_ratio, warmup_ratio)."""
    if total_steps < 1:
        raise ValueError(f"total optimizer steps must be >= 1 for the LR schedule, got {total_steps}")
    if not 0.0 <= optim_cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {optim_cfg.min_lr_ratio}")
    if not 0.0 <= optim_cfg.warmup_ratio < 1.0:
        raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {optim_cfg.warmup_ratio}")
    warmup = int(round(optim_cfg.warmup_ratio * total_steps))
    return LRSchedule(max_lr=optim_cfg.lr, min_lr=optim_cfg.lr * optim_cfg.min_lr_ratio, warmup_steps=warmup,
                      decay_steps=max(total_steps, warmup + 1))


def megatron_optimizer_config(optim_cfg, params_dtype: str, use_distributed_optimizer: bool):
    """megatron OptimizerConfig for Adam with this run's hyperparameters and precision."""
    from megatron.core.optimizer import OptimizerConfig

    if params_dtype not in _DTYPE_FLAGS:
        raise ValueError(f"model.params_dtype must be one of {list(_DTYPE_FLAGS)}, got '{params_dtype}'")
    bf16, fp16 = _DTYPE_FLAGS[params_dtype]
    return OptimizerConfig(
        optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.lr * optim_cfg.min_lr_ratio,
        weight_decay=optim_cfg.weight_decay, adam_beta1=optim_cfg.adam_beta1, adam_beta2=optim_cfg.adam_beta2,
        clip_grad=optim_cfg.clip_grad, bf16=bf16, fp16=fp16,
        params_dtype={"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            params_dtype],
        use_distributed_optimizer=use_distributed_optimizer)


def build_optimizer(ddp_chunks: list, optim_cfg, params_dtype: str, use_distributed_optimizer: bool):
    """get_megatron_optimizer over DDP-wrapped model chunks (biases and norms get no weight decay)."""
    from megatron.core.optimizer import get_megatron_optimizer

    return get_megatron_optimizer(megatron_optimizer_config(optim_cfg, params_dtype, use_distributed_optimizer),
                                  ddp_chunks)


def build_scheduler(optimizer, schedule: LRSchedule):
    """OptimizerParamScheduler for `schedule` (constant weight decay from the optimizer config)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    wd = sub_optimizers(optimizer)[0].config.weight_decay
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=schedule.max_lr, min_lr=schedule.min_lr,
        lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=schedule.decay_steps, lr_decay_style="cosine",
        start_wd=wd, end_wd=wd, wd_incr_steps=schedule.decay_steps, wd_incr_style="constant")


def sub_optimizers(optimizer) -> list:
    """The optimizers inside a ChainedOptimizer (or [optimizer])."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def current_lr(optimizer) -> float:
    for opt in sub_optimizers(optimizer):
        for group in opt.param_groups:
            if group.get("default_config", True):
                return float(group["lr"])
    return float("nan")


@torch.no_grad()
def step_optimizer(optimizer, clip_grad: float) -> StepResult:
    """Unscale -> global grad norm -> skip if not finite -> clip -> Adam -> copy/all-gather params.

    Every rank must call; the decision is the same everywhere because the norm is all-reduced.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # fp16 loss-scale overflow (the scaler already backed off)
        return StepResult(updated=False, grad_norm=float("nan"))
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return StepResult(updated=False, grad_norm=grad_norm)
    if clip_grad > 0.0:
        for opt in sub_optimizers(optimizer):
            params = opt.get_parameters()
            if params and not getattr(opt, "is_stub_optimizer", False):
                clip_grad_by_total_norm_fp32(
                    params, max_norm=clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    updated = bool(optimizer.step_with_ready_grads())
    return StepResult(updated=updated, grad_norm=grad_norm)


def init_states_for_load(optimizer) -> None:
    """Give every Adam state its tensors (and torch Adam's `step`) so a dist-checkpoint can be loaded into it.

    megatron's DistributedOptimizer builds its sharded state dict from existing state; a fresh optimizer has
    none. The dummy step runs on zero gradients with lr 0, so parameters do not move (even with weight decay).
    """
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        saved_lr = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()
        elif getattr(opt, "init_state_fn", None) is not None:
            opt.init_state_fn(inner, opt.config)
        for g, lr in zip(inner.param_groups, saved_lr):
            g["lr"] = lr


@contextlib.contextmanager
def keep_adam_step_on_load(optimizer):
    """While loading a DistributedOptimizer checkpoint, keep torch Adam's per-parameter `step`.

    With torch's Adam (no TE / apex fused Adam) every per-parameter state carries a `step` tensor, but the
    fully_reshardable checkpoint stores the step once in the param groups (restored by load_state_dict) and
    not per tensor, so megatron's state setter looks it up among the loaded tensors and fails (KeyError).
    The step is carried over from the already restored state instead, and un-shared afterwards.
    """
    patched = []
    for opt in sub_optimizers(optimizer):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def carry(model_param, tensors, _opt=opt, _setter=setter):
            if "step" not in tensors:
                group, order = _opt.model_param_group_index_map[model_param]
                state = _opt.optimizer.state[_opt.optimizer.param_groups[group]["params"][order]]
                if "step" in state:
                    tensors = {**tensors, "step": state["step"].clone()}
            return _setter(model_param, tensors)

        opt._set_main_param_and_optimizer_states = carry
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method
    # megatron's load_state_dict gives every parameter the SAME step tensor and torch keeps it shared, so
    # each Adam step would advance it once per parameter: give each parameter its own copy
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for state in (getattr(inner, "state", {}) or {}).values():
            if isinstance(state, dict) and isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
