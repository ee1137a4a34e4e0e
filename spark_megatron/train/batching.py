"""Training sequences -> padded micro-batches for the Megatron schedules.

Alignment: logits at position t predict token t+1, so the logprob of response token j (absolute position
prompt_len + j) is read at position prompt_len + j - 1. Every per-response-token tensor (advantages, old /
reference / rollout logprobs) is placed at those positions of a [b, s] grid; `response_mask` is 1 exactly there.

Shapes: pipeline p2p needs one [b, s] per schedule call, so with PP > 1 every micro-batch of a call is padded to
the call's longest sequence (rounded up, see `padded_length`) and short micro-batches get all-masked filler rows;
the actor therefore runs length-sorted groups of 4 x PP micro-batches as separate calls. Without PP each
micro-batch is padded only to its own longest sequence. Sequences are sorted by length before they are cut into
micro-batches, so rows of one micro-batch have similar lengths and little padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from spark_megatron.parallel.schedule import MicroBatch

PER_TOKEN_FIELDS = ("advantages", "old_logprobs", "ref_logprobs", "rollout_logprobs")
"""Optional per-response-token fields of a SequenceSample, carried into the micro-batch extras by name."""


class BatchError(ValueError):
    """A sequence that cannot be turned into a training row (names the sequence and the field)."""


@dataclass
class SequenceSample:
    """One prompt + response to score or train on."""

    tokens: Sequence[int]
    """Prompt followed by response token ids (list or 1-d integer tensor)."""
    prompt_len: int
    """Number of prompt tokens at the start of `tokens` (>= 1); the rest is the response."""
    advantages: Optional[object] = None
    """Per-response-token advantage (list/tensor of len(tokens) - prompt_len) or one float for every token."""
    old_logprobs: Optional[object] = None
    """Per-response-token logprobs of the policy that produced the data, as the trainer computes them;
    None = on-policy (ratio 1, the current policy's logprobs before the update)."""
    ref_logprobs: Optional[object] = None
    """Per-response-token logprobs of the frozen reference model (None = no KL term)."""
    rollout_logprobs: Optional[object] = None
    """Per-response-token logprobs reported by the rollout engine (truncated importance sampling)."""
    kind: str = "policy"
    """Task kind (policy / pointwise / pairwise / reflection ...), used for per-kind metrics."""
    images: Optional[list] = None
    """VL models: the prompt's prepared images (`spark_megatron.vision.PreparedImage`: pixel patches, grid_thw,
    key), in the order of their <|image_pad|> runs in `tokens` (each run already expanded to the image's
    token count). None or [] = text only. Sequences of one group may share the same objects: the actor's
    image cache encodes each distinct `key` once per pass."""

    @property
    def response_len(self) -> int:
        return len(self.tokens) - self.prompt_len

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class PackedMicroBatch(MicroBatch):
    """A schedule MicroBatch (tokens / position_ids [b, s], extras of per-token [b, s] tensors: labels (int64),
    response_mask (float) and the present PER_TOKEN_FIELDS) plus where each of its rows came from."""

    rows: list = field(default_factory=list)
    """Index into the caller's sequence list of each row; -1 for filler rows."""


def padded_length(n: int, max_len: Optional[int] = None) -> int:
    """Round a sequence length up to a multiple of 8 (<= 512) or 64 (longer): few distinct shapes, little waste."""
    unit = 8 if n <= 512 else 64
    out = -(-n // unit) * unit
    return min(out, max_len) if max_len else out


def _as_list(value, n: int, name: str, where: str) -> torch.Tensor:
    if isinstance(value, (int, float)):
        return torch.full((n,), float(value), dtype=torch.float32)
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() != n:
        raise BatchError(f"{where}: '{name}' has {t.numel()} values but the response has {n} tokens")
    if not torch.isfinite(t).all():
        raise BatchError(f"{where}: '{name}' contains non-finite values")
    return t


def validate(seqs: Sequence[SequenceSample], max_len: Optional[int] = None) -> None:
    """Raise BatchError naming the first malformed sequence (index and field)."""
    for i, s in enumerate(seqs):
        where = f"sequence {i}"
        if not isinstance(s, SequenceSample):
            raise BatchError(f"{where}: expected SequenceSample, got {type(s).__name__}")
        if not 1 <= s.prompt_len < len(s.tokens):
            raise BatchError(f"{where}: prompt_len {s.prompt_len} must be in [1, {len(s.tokens) - 1}] "
                             f"(len(tokens) = {len(s.tokens)}; the response needs >= 1 token)")
        if max_len is not None and len(s.tokens) > max_len:
            raise BatchError(f"{where}: {len(s.tokens)} tokens exceed the model's max_position_embeddings "
                             f"{max_len}")


def present_fields(seqs: Sequence[SequenceSample]) -> list:
    """PER_TOKEN_FIELDS set on every sequence; a field set on some sequences but not others is an error."""
    out = []
    for name in PER_TOKEN_FIELDS:
        have = [getattr(s, name) is not None for s in seqs]
        if all(have) and have:
            out.append(name)
        elif any(have):
            missing = have.index(False)
            raise BatchError(f"sequence {missing}: '{name}' is None while other sequences of the batch set it")
    return out


def length_sorted(indices: Sequence[int], seqs: Sequence[SequenceSample]) -> list:
    """Indices by decreasing length (stable), so neighbouring rows pad little."""
    return sorted(indices, key=lambda i: -len(seqs[i].tokens))


def shard_for_rank(indices: Sequence[int], seqs: Sequence[SequenceSample], rank: int, world: int) -> list:
    """This data-parallel rank's share: longest-first, dealt snake-wise so ranks get similar token counts."""
    ordered = length_sorted(indices, seqs)
    mine = []
    for pos, idx in enumerate(ordered):
        lap, k = divmod(pos, world)
        owner = k if lap % 2 == 0 else world - 1 - k
        if owner == rank:
            mine.append(idx)
    return mine


def split_minibatches(n: int, batch_size: int) -> list:
    """[[0..B-1], [B..2B-1], ...] in order; the last mini-batch may be smaller."""
    if batch_size < 1:
        raise BatchError(f"train_batch_size must be >= 1, got {batch_size}")
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def group_rows(indices: Sequence[int], micro_batch_size: int) -> list:
    return [list(indices[i:i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]


def build_microbatch(seqs: Sequence[SequenceSample], rows: Sequence[int], seq_len: int, fields: Sequence[str],
                     batch_rows: Optional[int] = None, pad_id: int = 0,
                     device: Optional[torch.device] = None) -> PackedMicroBatch:
    """Pack `rows` (indices into seqs; -1 = filler) into one [b, s] micro-batch padded to seq_len.

    `batch_rows` > len(rows) appends filler rows (all-masked, pad tokens) so every micro-batch of a pipeline
    schedule shares one shape.
    """
    rows = list(rows) + [-1] * max(0, (batch_rows or len(rows)) - len(rows))
    b = len(rows)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, seq_len), dtype=torch.float32)
    extras = {name: torch.zeros((b, seq_len), dtype=torch.float32) for name in fields}
    for r, idx in enumerate(rows):
        if idx < 0:
            continue
        s = seqs[idx]
        ids = torch.as_tensor(s.tokens, dtype=torch.long).flatten()
        n, p = ids.numel(), s.prompt_len
        if n > seq_len:
            raise BatchError(f"sequence {idx}: {n} tokens do not fit the micro-batch length {seq_len}")
        tokens[r, :n] = ids
        labels[r, :n - 1] = ids[1:]
        mask[r, p - 1:n - 1] = 1.0
        for name in fields:
            extras[name][r, p - 1:n - 1] = _as_list(getattr(s, name), n - p, name, f"sequence {idx}")
    pos = torch.arange(seq_len, dtype=torch.long).unsqueeze(0).expand(b, seq_len).contiguous()
    extras.update(labels=labels, response_mask=mask)
    if device is not None:
        tokens, pos = tokens.to(device), pos.to(device)
        extras = {k: v.to(device) for k, v in extras.items()}
    return PackedMicroBatch(tokens=tokens, position_ids=pos, extras=extras, rows=rows)


def plan_microbatches(seqs: Sequence[SequenceSample], indices: Sequence[int], micro_batch_size: int,
                      uniform_shape: bool, fields: Sequence[str] = (), max_len: Optional[int] = None,
                      device: Optional[torch.device] = None, min_microbatches: int = 0) -> list:
    """Cut `indices` (already this rank's share) into padded micro-batches.

    uniform_shape (pipeline parallel): one [micro_batch_size, padded max length] for all; otherwise each
    micro-batch is padded to its own longest row. `min_microbatches` adds all-filler micro-batches (a
    data-parallel rank with no data still has to join the gradient all-reduce).
    """
    ordered = length_sorted(indices, seqs)
    groups = group_rows(ordered, micro_batch_size)
    while len(groups) < min_microbatches:
        groups.append([])
    if not groups:
        return []
    if uniform_shape:
        longest = max((len(seqs[i].tokens) for g in groups for i in g), default=2)
        seq_len = padded_length(longest, max_len)
        return [build_microbatch(seqs, g, seq_len, fields, micro_batch_size, device=device) for g in groups]
    out = []
    for g in groups:
        longest = max((len(seqs[i].tokens) for i in g), default=2)
        out.append(build_microbatch(seqs, g, padded_length(longest, max_len), fields,
                                    batch_rows=max(len(g), 1), device=device))
    return out


def response_token_count(seqs: Sequence[SequenceSample], indices: Sequence[int]) -> int:
    return sum(seqs[i].response_len for i in indices)


def kind_counts(seqs: Sequence[SequenceSample], indices: Sequence[int]) -> dict:
    """{kind: (sequences, response tokens)} over `indices`."""
    out: dict = {}
    for i in indices:
        kind = str(getattr(seqs[i].kind, "value", seqs[i].kind))
        n, t = out.get(kind, (0, 0))
        out[kind] = (n + 1, t + seqs[i].response_len)
    return out
