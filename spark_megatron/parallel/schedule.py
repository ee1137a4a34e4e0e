"""Micro-batched forward (and backward) through megatron-core's pipeline schedules.

The same call serves TP-only (no pipelining), PP 1F1B and interleaved VPP: megatron picks the schedule from the
parallel state. Callers supply micro-batches of `MicroBatch` and a `loss_fn(output, mb) -> (loss, stats)` that
runs on the last pipeline stage with the model's (vocab-parallel) logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class MicroBatch:
    """One micro-batch; every tensor is [b, s] and on the compute device."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    extras: dict = field(default_factory=dict)
    """Per-token tensors the loss needs (labels, masks, advantages, old logprobs...), each [b, s]."""
    model_inputs: dict = field(default_factory=dict)
    """Extra keyword arguments for the model's forward (VL: image_embeds / pixel_values, image_grid_thw)."""


def _forward_step(loss_fn):
    def step(data_iterator, model):
        mb: MicroBatch = next(data_iterator)
        out = model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None, **mb.model_inputs)

        def loss_wrapper(output_tensor, non_loss_data: bool = False):
            # training: (loss, stats) -> megatron divides loss by num_microbatches (callers pre-scale), or
            # (loss, num_tokens, stats); collect mode: whatever loss_fn returns is stored as-is
            return loss_fn(output_tensor, mb)

        return out, loss_wrapper

    return step


def run_schedule(model_chunks: list, microbatches: list, loss_fn: Callable, forward_only: bool,
                 collect: bool = False, seq_length: Optional[int] = None) -> list:
    """Run all micro-batches through the pipeline; returns the per-micro-batch outputs of `loss_fn` on the
    last stage (empty list elsewhere). With `collect=True`, `loss_fn` may return any object (forward only).

    With PP > 1 every micro-batch must have the same [b, s] (p2p buffers are sized once per call); without PP
    each may differ, so callers can pad micro-batches individually. Training callers return either
    (loss, stats) -- megatron divides that loss by the number of micro-batches -- or (loss, num_tokens, stats),
    which megatron leaves unscaled when the model config has `calculate_per_token_loss` (the actor's choice).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        return []
    seq = seq_length or max(mb.tokens.shape[1] for mb in microbatches)
    mbs = microbatches[0].tokens.shape[0]
    if ps.get_pipeline_model_parallel_world_size() > 1:  # without PP each micro-batch may have its own shape
        for mb in microbatches:
            if mb.tokens.shape != (mbs, seq):
                raise ValueError(f"micro-batches must share one [b, s] shape for pipeline p2p; got "
                                 f"{tuple(mb.tokens.shape)} vs {(mbs, seq)}")
    fb = get_forward_backward_func()
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    iters = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    return fb(forward_step_func=_forward_step(loss_fn), data_iterator=iters,
              model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(microbatches),
              seq_length=seq, micro_batch_size=mbs, forward_only=forward_only,
              collect_non_loss_data=collect)
