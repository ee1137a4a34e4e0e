"""Which byte ranges of which files make up a tensor, when it is a sequence of whole rows of other tensors.

Most of a model converts without arithmetic: a Megatron chunk (one TP shard of one layer's parameter, or one
half of a gated MLP's) is a run of whole rows of one HF tensor (embedding, gate or up, column-parallel weights,
a whole row-parallel weight at TP 1), rows interleaved from a few (fused QKV), or rows followed by zero padding
(the vocab); the HF tensors come back out of chunks the same way. Such a tensor is written as a list of Pieces
(mapped file ranges, zeros) with one copy, page cache to page cache, never assembled in memory. The row runs come
from the mapping's own layout (models/layout.derive_layout); anything else (columns of a row-parallel weight at
TP > 1, dtype changes, the vision MLP's padding) returns None and the caller assembles the tensor in a buffer.
"""
from __future__ import annotations

from typing import Optional

from spark_megatron.models.hf_files import Piece
from spark_megatron.models.layout import derive_layout, hf_shapes, layout_fits
from spark_megatron.models.mapping import VocabParallelMapping


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def view_rows(view, shape: tuple) -> Optional[tuple]:
    """(first row, rows) when a ShardView covers whole consecutive rows (dim 0) of a contiguous parameter of
    `shape`, else None."""
    if not view.size or tuple(view.size[1:]) != tuple(shape[1:]):
        return None
    row = _numel(shape[1:])
    strides, acc = [], 1
    for d in reversed(view.size):
        strides.insert(0, acc)
        acc *= d
    same = all(a == b for a, b, d in zip(strides, view.stride, view.size) if d > 1)
    if not same or view.storage_offset % max(row, 1):
        return None
    return view.storage_offset // max(row, 1), view.size[0]


def _runs(layout_out, rank: int) -> list:
    """[(shard row, hf row, rows)] of one HF output's segments held by `rank`."""
    out = []
    for seg in layout_out.segments:
        if seg.rank != rank:
            continue
        hf_row = seg.dst
        for start, length in seg.src:
            out.append((start, hf_row, length))
            hf_row += length
    return out


def shard_row_sources(mapping, shard_shape: tuple, tp_rank: int, tp_size: int) -> Optional[list]:
    """The rows (dim 0) of this rank's shard of a parameter, in order, as [(hf output index or None for zeros,
    hf row, shard row, rows)], or None when the shard is not made of whole HF rows."""
    shard_shape = tuple(shard_shape)
    layout, shapes = derive_layout(mapping, shard_shape, tp_size), hf_shapes(mapping, shard_shape, tp_size)
    if not layout_fits(layout, shard_shape, shapes):
        return None
    runs = []
    for j, out in enumerate(layout):
        mine = _runs(out, tp_rank)
        if out.dim == 0:
            runs += [(s, j, h, n) for s, h, n in mine]
        elif mine == [(0, 0, shard_shape[out.dim])] and tuple(shapes[j]) == shard_shape:
            runs.append((0, j, 0, shard_shape[0]))  # the whole tensor (TP 1, or a replicated parameter)
        else:
            return None
    sources, pos = [], 0
    for start, j, hf_row, n in sorted(runs):
        if start > pos:
            if not isinstance(mapping, VocabParallelMapping):
                return None
            sources.append((None, 0, pos, start - pos))
        sources.append((j, hf_row, start, n))
        pos = start + n
    if pos < shard_shape[0]:
        if not isinstance(mapping, VocabParallelMapping):  # the only mapping whose unmapped rows are zeros
            return None
        sources.append((None, 0, pos, shard_shape[0] - pos))
    return sources


def import_pieces(sources: list, rows: tuple, hf_names: list, reader, row_bytes: int) -> list:
    """Pieces of shard rows [rows[0], rows[0] + rows[1]) from `shard_row_sources`."""
    lo, hi = rows[0], rows[0] + rows[1]
    pieces = []
    for j, hf_row, start, n in sources:
        a, b = max(lo, start), min(hi, start + n)
        if a >= b:
            continue
        if j is None:
            pieces.append(Piece(None, 0, (b - a) * row_bytes))
        else:
            pieces.append(reader.rows(hf_names[j], hf_row + a - start, b - a))
    return pieces


def hf_row_runs(mapping, full_shape: tuple, index: int) -> Optional[list]:
    """HF output `index` of a TP1 parameter of `full_shape` as [(parameter row, rows)] in HF row order, or None
    when it is not made of whole parameter rows."""
    full_shape = tuple(full_shape)
    layout = derive_layout(mapping, full_shape, 1)
    if not layout_fits(layout, full_shape, hf_shapes(mapping, full_shape, 1)):
        return None
    out = layout[index]
    runs = sorted((h, s, n) for s, h, n in _runs(out, 0))
    if out.dim == 0:
        return [(s, n) for _, s, n in runs]
    if runs == [(0, 0, full_shape[out.dim])] and len(layout) == 1:
        return [(0, full_shape[0])]
    return None


def export_pieces(runs: list, views: list, param_shape: tuple, reader, dtype) -> Optional[list]:
    """Pieces of the parameter rows `runs` read from the checkpoint's chunks through the parameter's ShardViews
    (each must cover whole rows and map them to whole stored rows), or None."""
    spans = []
    for v in views:
        r = view_rows(v, param_shape)
        if r is None:
            return None
        spans.append((r[0], r[1], v))
    pieces = []
    for start, n in runs:
        while n > 0:
            hit = next(((r0, m, v) for r0, m, v in spans if r0 <= start < r0 + m), None)
            if hit is None:
                return None
            r0, m, v = hit
            take = min(n, r0 + m - start)
            lead = len(v.global_shape) - len(param_shape)
            got = reader.row_pieces(v.key, tuple(v.global_offset[:lead]), v.global_offset[lead] + start - r0, take,
                                    dtype)
            if got is None:
                return None
            pieces += got
            start, n = start + take, n - take
    return pieces
