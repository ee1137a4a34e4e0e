"""Declarative HF <-> Megatron parameter mappings with the TP split/gather inside each mapping.

A mapping binds one Megatron parameter (name pattern, `*` = global layer index) to one or more HF tensors and
knows three things: how to cut this TP rank's shard out of the HF tensors (`hf_to_shard`), how to rebuild the
HF tensors from the TP-gathered Megatron tensor (`full_to_hf`), and along which dim TP shards concatenate
(`tp_dim`; fused layouts such as gate/up fix the concatenation up themselves in `gather_shards`).
Conversion, loading and weight sync all go through these objects, so a layout rule lives in exactly one place.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


class MappingError(ValueError):
    """A tensor that does not fit its mapping (shape, missing member of a fused group, unknown name)."""


@dataclass(frozen=True)
class ParamMapping:
    megatron: str
    """Megatron parameter name; `*` stands for the global layer index."""
    hf: tuple
    """HF tensor names (same `*`); several for fused Megatron parameters."""

    tp_dim: Optional[int] = None
    """Dim along which the parameter is split over TP (None = replicated)."""

    # ---- pattern helpers
    def resolve(self, layer: Optional[int]) -> tuple:
        """(megatron_name, hf_names) with `*` replaced by the global layer index."""
        sub = (lambda s: s.replace("*", str(layer))) if layer is not None else (lambda s: s)
        return sub(self.megatron), tuple(sub(h) for h in self.hf)

    @property
    def per_layer(self) -> bool:
        return "*" in self.megatron

    # ---- layout rules; subclasses override
    def hf_to_full(self, hf: Sequence[torch.Tensor]) -> torch.Tensor:
        """HF tensors -> the unsharded (TP1) Megatron tensor."""
        return hf[0]

    def full_to_hf(self, full: torch.Tensor) -> list:
        """Unsharded Megatron tensor -> HF tensors (in `self.hf` order)."""
        return [full]

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        if self.tp_dim is None or tp_size == 1:
            return full
        size = full.shape[self.tp_dim]
        if size % tp_size:
            raise MappingError(f"{self.megatron}: dim {self.tp_dim} of size {size} is not divisible by TP {tp_size}")
        return full.chunk(tp_size, dim=self.tp_dim)[tp_rank]

    def gather_shards(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """TP shards (in rank order) -> unsharded Megatron tensor."""
        if self.tp_dim is None or len(shards) == 1:
            return shards[0]
        return torch.cat(list(shards), dim=self.tp_dim)

    def hf_to_shard(self, hf: Sequence[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
        return self.shard(self.hf_to_full(hf), tp_rank, tp_size)


@dataclass(frozen=True)
class ReplicatedMapping(ParamMapping):
    """Same tensor on every TP rank (norm weights)."""


@dataclass(frozen=True)
class ColumnParallelMapping(ParamMapping):
    tp_dim: Optional[int] = 0


@dataclass(frozen=True)
class RowParallelMapping(ParamMapping):
    tp_dim: Optional[int] = 1


@dataclass(frozen=True)
class VocabParallelMapping(ParamMapping):
    """Embedding / output layer: rows padded from the true vocab to the Megatron padded vocab, then split."""

    tp_dim: Optional[int] = 0
    vocab_size: int = 0
    padded_vocab_size: int = 0

    def hf_to_full(self, hf):
        t = hf[0]
        if t.shape[0] != self.vocab_size:
            raise MappingError(f"{self.hf[0]}: expected {self.vocab_size} rows, got {t.shape[0]}")
        pad = self.padded_vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))]) if pad else t

    def full_to_hf(self, full):
        return [full[: self.vocab_size]]


@dataclass(frozen=True)
class QKVMapping(ParamMapping):
    """HF q/k/v (weights or biases) <-> Megatron fused linear_qkv, interleaved per query group.

    Megatron row layout: for each of the G = num_kv_heads groups, [q heads of the group (H/G), k, v], each head
    `head_dim` rows. Shards along dim 0 split whole groups, so TP concatenation keeps the TP1 layout.
    """

    tp_dim: Optional[int] = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0

    def _grouped(self, t, heads_per_group):
        return t.reshape((self.num_kv_heads, heads_per_group * self.head_dim) + tuple(t.shape[1:]))

    def hf_to_full(self, hf):
        q, k, v = hf
        qpg = self.num_heads // self.num_kv_heads
        want = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim)
        if q.shape[0] != want[0] or k.shape[0] != want[1] or v.shape[0] != want[1]:
            raise MappingError(f"{self.hf}: q/k/v rows {q.shape[0]}/{k.shape[0]}/{v.shape[0]}, expected "
                               f"{want[0]}/{want[1]}/{want[1]}")
        fused = torch.cat([self._grouped(q, qpg), self._grouped(k, 1), self._grouped(v, 1)], dim=1)
        return fused.reshape((-1,) + tuple(q.shape[1:]))

    def full_to_hf(self, full):
        qpg = self.num_heads // self.num_kv_heads
        g = full.reshape((self.num_kv_heads, (qpg + 2) * self.head_dim) + tuple(full.shape[1:]))
        q, k, v = g.split([qpg * self.head_dim, self.head_dim, self.head_dim], dim=1)
        tail = tuple(full.shape[1:])
        return [q.reshape((-1,) + tail), k.reshape((-1,) + tail), v.reshape((-1,) + tail)]


@dataclass(frozen=True)
class GatedMLPMapping(ParamMapping):
    """HF gate_proj + up_proj <-> Megatron linear_fc1; each TP shard is [gate_shard; up_shard]."""

    tp_dim: Optional[int] = 0

    def hf_to_full(self, hf):
        gate, up = hf
        if gate.shape != up.shape:
            raise MappingError(f"{self.hf}: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        return torch.cat([gate, up], dim=0)

    def full_to_hf(self, full):
        return list(full.chunk(2, dim=0))

    def shard(self, full, tp_rank, tp_size):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]], dim=0)

    def gather_shards(self, shards):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


# ---- zero-padded widths: a TP-split dim the HF model does not make divisible (the Qwen2.5-VL vision MLP)
def padded_size(size: int, tp: int, shard_multiple: int = 1, multiple: int = 1) -> int:
    """Smallest width >= `size` that splits into `tp` shards each a multiple of `shard_multiple`, and is itself
    a multiple of `multiple` (a `multiple` that every usual TP x shard_multiple divides keeps the width, and
    so the checkpoint shape, the same across those TP sizes)."""
    unit = math.lcm(shard_multiple * tp, multiple)
    return -(-size // unit) * unit


def zero_pad(t: torch.Tensor, dim: int, size: int, to: int) -> torch.Tensor:
    """The first `size` entries of `t` along `dim`, followed by zeros up to `to` entries."""
    t = t.narrow(dim, 0, size)
    if to == size:
        return t
    fill = list(t.shape)
    fill[dim] = to - size
    return torch.cat([t, t.new_zeros(fill)], dim=dim)


@dataclass(frozen=True)
class PaddedGatedMLPMapping(GatedMLPMapping):
    """GatedMLPMapping whose intermediate dim is `size` in HF and zero-padded to `padded_size(size, tp, ...)` in
    Megatron (gate and up each padded at their end). Import pads, export strips, so HF -> Megatron -> HF is exact
    at any TP; the full (gathered) tensor may carry any padding, `shard` re-fits it to the target TP."""

    size: int = 0
    shard_multiple: int = 1
    multiple: int = 1

    def _fit(self, full, tp):
        to = padded_size(self.size, tp, self.shard_multiple, self.multiple)
        return torch.cat([zero_pad(half, 0, self.size, to) for half in full.chunk(2, dim=0)], dim=0)

    def hf_to_full(self, hf):
        if hf[0].shape[0] != self.size:
            raise MappingError(f"{self.hf[0]}: expected {self.size} rows, got {hf[0].shape[0]}")
        return self._fit(super().hf_to_full(hf), 1)

    def full_to_hf(self, full):
        return [half[: self.size] for half in super().full_to_hf(full)]

    def shard(self, full, tp_rank, tp_size):
        return super().shard(self._fit(full, tp_size), tp_rank, tp_size)


@dataclass(frozen=True)
class PaddedRowParallelMapping(RowParallelMapping):
    """RowParallelMapping whose input dim is `size` in HF and zero-padded columns up to `padded_size(...)`."""

    size: int = 0
    shard_multiple: int = 1
    multiple: int = 1

    def _fit(self, full, tp):
        return zero_pad(full, 1, self.size, padded_size(self.size, tp, self.shard_multiple, self.multiple))

    def hf_to_full(self, hf):
        if hf[0].shape[1] != self.size:
            raise MappingError(f"{self.hf[0]}: expected {self.size} columns, got {hf[0].shape[1]}")
        return self._fit(hf[0], 1)

    def full_to_hf(self, full):
        return [full[:, : self.size]]

    def shard(self, full, tp_rank, tp_size):
        return super().shard(self._fit(full, tp_size), tp_rank, tp_size)


_LAYER_RE = re.compile(r"\.(\d+)\.")


class MappingRegistry:
    """All mappings of one model family instance; looks parameters up by Megatron or HF name."""

    def __init__(self, mappings: Sequence[ParamMapping], num_layers: int):
        self.mappings = list(mappings)
        self.num_layers = num_layers
        self._by_mcore = {m.megatron: m for m in self.mappings}
        self._by_hf = {h: m for m in self.mappings for h in m.hf}

    @staticmethod
    def _split_layer(name: str, prefix_of_layers: str):
        """'decoder.layers.3.mlp...' -> ('decoder.layers.*.mlp...', 3)."""
        if prefix_of_layers and name.startswith(prefix_of_layers):
            rest = name[len(prefix_of_layers):]
            idx, _, tail = rest.partition(".")
            if idx.isdigit():
                return f"{prefix_of_layers}*.{tail}", int(idx)
        return name, None

    def for_megatron(self, name: str, layer_prefix: str = "decoder.layers.") -> tuple:
        """Megatron name with a GLOBAL layer index -> (mapping, layer)."""
        pattern, layer = self._split_layer(name, layer_prefix)
        if pattern not in self._by_mcore:
            raise MappingError(f"no mapping for Megatron parameter '{name}'")
        return self._by_mcore[pattern], layer

    def for_hf(self, name: str, layer_prefix: str = "model.layers.") -> tuple:
        pattern, layer = self._split_layer(name, layer_prefix)
        if pattern not in self._by_hf:
            raise MappingError(f"unknown HF tensor '{name}'")
        if layer is not None and not 0 <= layer < self.num_layers:
            raise MappingError(f"HF tensor '{name}': layer {layer} out of range (model has {self.num_layers})")
        return self._by_hf[pattern], layer

    def hf_names(self) -> list:
        """Every HF tensor name the model has, layers expanded."""
        out = []
        for m in self.mappings:
            layers = range(self.num_layers) if m.per_layer else [None]
            for layer in layers:
                out.extend(m.resolve(layer)[1])
        return out


@dataclass(frozen=True)
class HFNaming:
    """The tensor-name schemes one family's HF checkpoints come in. The mappings use `schemes[0]` ("canonical");
    `rules[scheme]` = ((canonical prefix, that scheme's prefix), ...), and a name under no rule's prefix is not a
    name of that scheme."""

    schemes: tuple
    rules: dict

    def to_scheme(self, name: str, scheme: str) -> str:
        """Canonical name -> the name under `scheme`."""
        for canonical, prefix in self.rules[scheme]:
            if name.startswith(canonical):
                return prefix + name[len(canonical):]
        return name

    def to_canonical(self, name: str, scheme: str) -> Optional[str]:
        """A name under `scheme` -> its canonical name (None when it is not a name of that scheme)."""
        for canonical, prefix in sorted(self.rules[scheme], key=lambda r: -len(r[1])):
            if name.startswith(prefix):
                return canonical + name[len(prefix):]
        return None

    def detect(self, names: list, known: set, source: str) -> str:
        """The scheme `names` use, judged by which scheme turns them into `known` canonical names. Mixed schemes
        are an error (a checkpoint written by one tool uses one); no match at all falls back to the canonical one,
        so the missing-tensor checks name what is absent."""
        hits = {s: [] for s in self.schemes}
        for n in names:  # names every scheme spells alike (lm_head.weight) tell nothing
            accepting = [s for s in self.schemes if self.to_canonical(n, s) in known]
            if len(accepting) == 1:
                hits[accepting[0]].append(n)
        used = [s for s in self.schemes if hits[s]]
        if len(used) > 1:
            a, b = used[0], used[1]
            raise MappingError(f"{source}: the checkpoint mixes {a} tensor names (e.g. '{hits[a][0]}') with {b} "
                               f"names (e.g. '{hits[b][0]}')")
        return used[0] if used else self.schemes[0]
