"""Numerical parity of a Megatron model against its HF `transformers` oracle.

Each pipeline stage runs the real Megatron schedule, records the output of each of its layers (global
index) and, on the last stage, the full-vocab logits; the HF model runs the same tokens. Diffs are computed
where the data lives and all-gathered, so rank 0 can print one report for any TP/PP layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ParityReport:
    logits_max_abs_diff: float = float("nan")
    hidden_max_abs_diff: dict = field(default_factory=dict)
    """global layer index -> max |megatron - hf| of that layer's output ('final_norm' for the last norm)."""

    @property
    def worst(self) -> float:
        vals = [self.logits_max_abs_diff] + list(self.hidden_max_abs_diff.values())
        return max(v for v in vals if v == v)

    def lines(self) -> list:
        out = [f"logits max abs diff: {self.logits_max_abs_diff:.3e}"]
        for k in sorted(self.hidden_max_abs_diff, key=lambda x: (isinstance(x, str), x)):
            out.append(f"layer {k} hidden max abs diff: {self.hidden_max_abs_diff[k]:.3e}")
        return out


@dataclass
class ParityInputs:
    """What both models run: tokens [b, s] plus, for VL models, Megatron's mRoPE ids and image inputs and the
    matching HF keyword arguments (None / {} for text models)."""

    tokens: torch.Tensor
    position_ids: torch.Tensor = None
    """None: text positions 0..s-1."""
    megatron_inputs: dict = field(default_factory=dict)
    hf_inputs: dict = field(default_factory=dict)


def as_inputs(inputs) -> ParityInputs:
    return inputs if isinstance(inputs, ParityInputs) else ParityInputs(inputs)


def _capture_layer_outputs(model, store: dict) -> list:
    handles = []
    lm = getattr(model, "language_model", model)  # a VL stage wraps the language model
    decoder = getattr(lm, "decoder", None)
    if decoder is None:
        return handles
    for layer in decoder.layers:
        idx = layer.layer_number - 1

        def hook(_m, _inp, out, idx=idx):
            t = out[0] if isinstance(out, tuple) else out
            store[idx] = t.detach().transpose(0, 1).float().clone()  # [s, b, h] -> [b, s, h]

        handles.append(layer.register_forward_hook(hook))
    if getattr(decoder, "final_layernorm", None) is not None:
        def norm_hook(_m, _inp, out):
            store["final_norm"] = out.detach().transpose(0, 1).float().clone()

        handles.append(decoder.final_layernorm.register_forward_hook(norm_hook))
    return handles


@torch.no_grad()
def megatron_forward(model, inputs, vocab_size: int):
    """ParityInputs (or [b, s] tokens) -> (logits [b, s, vocab] on the last stage else None, {layer: hidden
    [b, s, h]})."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from spark_megatron.parallel.schedule import MicroBatch, run_schedule

    inputs = as_inputs(inputs)
    hidden: dict = {}
    handles = _capture_layer_outputs(model, hidden)
    tokens = inputs.tokens
    pos = inputs.position_ids if inputs.position_ids is not None else \
        torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)

    def collect_logits(output, _mb):
        return gather_from_tensor_model_parallel_region(output)[..., :vocab_size].float().clone()

    model.eval()
    try:
        outs = run_schedule([model], [MicroBatch(tokens, pos, model_inputs=dict(inputs.megatron_inputs))],
                            collect_logits, forward_only=True, collect=True)
    finally:
        for h in handles:
            h.remove()
    return (outs[0] if outs else None), hidden


@torch.no_grad()
def hf_forward(hf_model, inputs):
    """ParityInputs (or [b, s] tokens) -> (logits [b, s, vocab], {layer: hidden}), HF's hidden_states
    re-indexed per layer."""
    inputs = as_inputs(inputs)
    out = hf_model(input_ids=inputs.tokens, output_hidden_states=True, **inputs.hf_inputs)
    hs = out.hidden_states  # [emb, after layer 0, ..., after layer L-2, final_norm(after layer L-1)]
    layers = {i: hs[i + 1].float() for i in range(len(hs) - 2)}
    layers["final_norm"] = hs[-1].float()
    return out.logits.float(), layers


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over all elements."""
    return (a - b).abs().max().item()


def max_relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst position's relative difference: max over [..., position] of ||a - b|| / ||b|| along the last dim.
    Scale-free per token, so a token with huge activations (whose rounding error is large in absolute terms)
    cannot hide a wrong one with small activations."""
    num = (a - b).float().norm(dim=-1)
    den = b.float().norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return (num / den).max().item()


def output_diffs(logits_a, hidden_a: dict, logits_b, hidden_b: dict, metric=max_abs_diff) -> ParityReport:
    """`metric(a, b)` of the logits (if `logits_a` is not None) and of every layer both sides have (the report's
    fields say max abs diff; they hold whatever `metric` measures)."""
    out = ParityReport()
    if logits_a is not None:
        out.logits_max_abs_diff = metric(logits_a, logits_b)
    for k, v in hidden_a.items():
        if k in hidden_b:  # HF exposes the last layer only after the final norm ('final_norm')
            out.hidden_max_abs_diff[k] = metric(v, hidden_b[k])
    return out


def merge_reports(local: ParityReport) -> ParityReport:
    """Every rank's report (each covers its own stage's outputs) merged on every rank (all ranks must call)."""
    import torch.distributed as dist

    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, local)
    merged = ParityReport()
    for r in reports:
        if r.logits_max_abs_diff == r.logits_max_abs_diff:
            merged.logits_max_abs_diff = max(r.logits_max_abs_diff, merged.logits_max_abs_diff) \
                if merged.logits_max_abs_diff == merged.logits_max_abs_diff else r.logits_max_abs_diff
        for k, v in r.hidden_max_abs_diff.items():
            merged.hidden_max_abs_diff[k] = max(v, merged.hidden_max_abs_diff.get(k, 0.0))
    return merged


def compare_stage(model, hf_model, inputs, vocab_size: int) -> ParityReport:
    """Diff this rank's stage against HF, then merge every rank's findings (all ranks must call).
    `inputs`: ParityInputs, or a plain [b, s] token tensor for text models."""
    m_logits, m_hidden = megatron_forward(model, inputs, vocab_size)
    h_logits, h_hidden = hf_forward(hf_model, inputs)
    return merge_reports(output_diffs(m_logits, m_hidden, h_logits, h_hidden))
