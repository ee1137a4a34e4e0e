"""Where each slice of an HF tensor lives in a Megatron parameter's TP shards, derived from the mapping itself.

Every layout rule stays in `models/mapping.py`: the mapping's `gather_shards` + `full_to_hf` run once on small
int64 "probe" shards whose values encode (rank, index along the TP dim, position in the other dims). Decoding the
HF outputs gives, per HF tensor, runs along the TP dim (`Segment`). A mapping that does anything but move whole
slices along that dim (arithmetic, zero fill, moving data across other dims) fails the decoding: callers then use
the mapping's own tensor functions, still correct.

Users: weight sync (`sync/reshard.py`: peers send the leader exactly its segments, received in place) and HF
import (`models/weights.py`: each rank copies its segments from the HF tensors straight into its parameter).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Segment:
    """Rows [dst, dst + length) along `dim` of one HF tensor, all from one TP rank's shard."""

    rank: int
    dst: int
    length: int
    src: tuple
    """((start, length), ...) along `dim` in that rank's shard, concatenated in order."""


@dataclass(frozen=True)
class OutputLayout:
    dim: int
    segments: tuple


# ------------------------------------------------------------------------------------------ layout derivation

def _probe_shards(shard_shape: tuple, dim: int, ranks: int) -> list:
    """Per-rank int64 probe shards: `dim` at full size, every other dim of size 2 (so a mapping that moved data
    across them would be caught). Value = 3 * (global_index * W + w) + 1, W = product of the other dims, w the
    position in them; the affine encoding makes arithmetic on the values detectable."""
    n, other = shard_shape[dim], len(shard_shape) - 1
    width = 2 ** other
    payload = torch.arange(width, dtype=torch.int64).view((1,) + (2,) * other)
    rows = torch.arange(ranks * n, dtype=torch.int64).view((ranks * n,) + (1,) * other)
    ids = (3 * (rows * width + payload) + 1).movedim(0, dim)
    return [s.contiguous() for s in ids.split(n, dim=dim)]


def _decode(h: torch.Tensor, dim: int, ndim: int) -> Optional[torch.Tensor]:
    """Global source index along the TP dim of every entry of a probe output along `dim`, or None if the output
    is not a pure selection of whole slices."""
    if h.dtype != torch.int64 or h.dim() != ndim or any(h.shape[d] != 2 for d in range(ndim) if d != dim):
        return None
    width = 2 ** (ndim - 1)
    v = h.movedim(dim, 0).reshape(h.shape[dim], width) - 1
    if bool((v % 3 != 0).any()):
        return None
    v = v // 3
    if bool((v % width != torch.arange(width)).any()) or bool((v // width != v[:, :1] // width).any()):
        return None
    return v[:, 0] // width


def _segments(src: torch.Tensor, n: int, dim: int) -> OutputLayout:
    """Cut decoded source indices (1-D int64) into per-rank segments (consecutive in the HF tensor), each a list
    of runs that are consecutive in that rank's shard too. Vectorised: only segment and run starts are visited
    in Python (a vocab-sized probe has 10^5 rows and a handful of runs)."""
    if src.numel() == 0:
        return OutputLayout(dim, ())
    rank, local = src // n, src % n
    seg_break = torch.ones(src.numel(), dtype=torch.bool)
    seg_break[1:] = rank[1:] != rank[:-1]
    run_break = seg_break.clone()
    run_break[1:] |= local[1:] != local[:-1] + 1
    seg_starts = seg_break.nonzero().flatten().tolist() + [src.numel()]
    run_starts = run_break.nonzero().flatten().tolist() + [src.numel()]
    local_l, rank_l = local.tolist() if len(run_starts) > 64 else None, rank.tolist() if len(seg_starts) > 64 else None
    segments, r = [], 0
    for a, b in zip(seg_starts[:-1], seg_starts[1:]):
        runs = []
        while run_starts[r] < b:
            start = run_starts[r]
            runs.append((int(local_l[start] if local_l else local[start]), run_starts[r + 1] - start))
            r += 1
        segments.append(Segment(int(rank_l[a] if rank_l else rank[a]), a, b - a, tuple(runs)))
    return OutputLayout(dim, tuple(segments))


@functools.lru_cache(maxsize=1024)
def derive_layout(mapping, shard_shape: tuple, tp: int) -> Optional[tuple]:
    """Per HF output of `mapping`: where its slices along the TP dim come from (an OutputLayout), or None when
    the mapping is not a pure slice permutation along that dim (the caller falls back to gather + mapping).

    Cached: every layer shares its mapping object and shard shape, so a model derives a handful of layouts once.
    """
    # probe along the TP dim even at TP1: that is the dim the mapping's layout rules act on (e.g. padded columns)
    ranks = tp if mapping.tp_dim is not None and tp > 1 else 1
    dim = mapping.tp_dim if mapping.tp_dim is not None else 0
    if not shard_shape or dim >= len(shard_shape):
        return None
    n = shard_shape[dim]
    try:
        outs = mapping.full_to_hf(mapping.gather_shards(_probe_shards(shard_shape, dim, ranks)))
    except Exception:  # noqa: BLE001 - a mapping that cannot run on int64 probes is handled by the fallback
        return None
    decoded = [_decode(h, dim, len(shard_shape)) for h in outs]
    if any(d is None for d in decoded):
        return None
    everything = torch.cat(decoded) if decoded else torch.empty(0, dtype=torch.int64)
    if everything.numel() and (int(everything.min()) < 0 or int(everything.max()) >= ranks * n
                               or everything.unique().numel() != everything.numel()):
        return None
    return tuple(_segments(d, n, dim) for d in decoded)


@functools.lru_cache(maxsize=1024)
def hf_shapes(mapping, shard_shape: tuple, tp: int) -> tuple:
    """Full-size HF output shapes of one parameter, from the mapping run on meta tensors (as `stage_specs`)."""
    shape = list(shard_shape)
    if mapping.tp_dim is not None and tp > 1:
        shape[mapping.tp_dim] *= tp
    return tuple(tuple(int(d) for d in t.shape) for t in mapping.full_to_hf(torch.empty(shape, device="meta")))


def layout_fits(layout: Optional[tuple], shard_shape: tuple, shapes: tuple) -> bool:
    """The probe layout scales to the real tensors: same HF count, and each HF shape is the shard's shape with
    the TP dim replaced by the output's length (the other dims travel whole). This also catches a mapping that
    slices another dim, which the size-2 probe cannot see."""
    if layout is None or len(layout) != len(shapes):
        return False
    for out, shape in zip(layout, shapes):
        length = sum(s.length for s in out.segments)
        want = list(shard_shape)
        want[out.dim] = length
        if tuple(want) != tuple(shape):
            return False
    return True
