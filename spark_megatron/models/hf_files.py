"""Safetensors files read through a private mmap: the header is parsed and checked when the file is opened, and
each tensor is served as a zero-copy view of the mapping.

Why not `safetensors.safe_open`: a converter reads only its own slices of the tensors and must keep its resident
memory bounded by what it holds, so it needs (a) views it can narrow before anything is copied and (b) a way to
drop the pages it has read from its address space (`release`), which a library-owned mapping does not offer.
The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensor bytes, offsets
relative to the end of the header.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20
"""The safetensors reference implementation refuses larger headers too."""


class CheckpointError(ValueError):
    """A missing, corrupt or incomplete checkpoint file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are in its file."""

    name: str
    dtype: torch.dtype
    shape: tuple
    offset: int
    """Absolute byte offset in the file."""
    nbytes: int


def _parse_header(path: Path, raw: bytes, data_start: int, file_size: int) -> dict:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file (entry '{name}': {e!r})") from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or data_start + end > file_size:
            raise CheckpointError(f"{path}: corrupt safetensors file (tensor '{name}' {entry['dtype']}{list(shape)} "
                                  f"at bytes {begin}-{end} of a {file_size - data_start}-byte data section)")
        out[name] = TensorInfo(name, dtype, shape, data_start + begin, nbytes)
    return out


class SafetensorsFile:
    """One .safetensors file: tensor metadata from its header, tensors as views of a private (copy-on-write) mmap."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: corrupt safetensors file (shorter than its 8-byte header size)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(f"{self.path}: corrupt safetensors file (header of {n} bytes in a "
                                          f"{size}-byte file)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self.tensors = _parse_header(self.path, raw, 8 + n, size)
        self._mm: Optional[mmap.mmap] = None
        self._fd: Optional[int] = None

    def keys(self) -> list:
        return list(self.tensors)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable views, never the file
        return self._mm

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a view of the mapping (no copy; pages are read on first touch)."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._map(), dtype=info.dtype, count=info.nbytes // info.dtype.itemsize,
                                offset=info.offset)
        return flat.view(info.shape)

    def rows(self, name: str, row0: int, nrows: int) -> "Piece":
        """Rows [row0, row0 + nrows) along dim 0 of a tensor, as a byte range of this file."""
        info = self.tensors[name]
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return Piece(self._fd, info.offset + row0 * row_bytes, nrows * row_bytes)

    def release(self, name: Optional[str] = None) -> None:
        """Drop the pages of one tensor (or the whole file) from this process's resident memory; they stay in the
        page cache and a later access reads them again."""
        if self._mm is None:
            return
        if name is None:
            release_pages(self._mm, 0, len(self._mm))
        else:
            info = self.tensors[name]
            release_pages(self._mm, info.offset, info.nbytes)


def release_pages(mm: mmap.mmap, offset: int, length: int) -> None:
    """madvise(DONTNEED) the whole pages of [offset, offset + length) of a private file mapping: the process's
    copies of them go, the file's page cache stays."""
    start = offset - offset % mmap.PAGESIZE
    end = min(len(mm), offset + length)
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


@dataclass(frozen=True)
class Piece:
    """A byte range of an open file, or `length` zero bytes when `fd` is None: one part of a tensor's bytes."""

    fd: Optional[int]
    offset: int
    length: int


_ZEROS = bytes(1 << 20)
_SLICE = 64 << 20
"""Pieces are copied in slices of this size, so a writer can start each slice's writeback as it goes."""


def _copy_range(src: int, dst: int, offset: int, n: int) -> None:
    """n bytes of `src` at `offset` appended to `dst`: copy_file_range (inside the kernel, no user-space buffer,
    nothing resident), else pread + write."""
    done = 0
    while done < n:
        try:
            got = os.copy_file_range(src, dst, n - done, offset + done)
        except OSError:  # other filesystem, no support: copy through a small buffer
            got = 0
        if got <= 0:
            buf = bytearray(min(n - done, 16 << 20))
            got = os.preadv(src, [buf], offset + done)
            if got <= 0:
                raise OSError(f"unexpected end of file reading {n} bytes at {offset}")
            write_all(dst, memoryview(buf)[:got])
        done += got


def write_pieces(fd: int, pieces: list, on_written=None) -> int:
    """Append the pieces' bytes to `fd` in order (one copy, page cache to page cache); returns the bytes written.
    `on_written(n)` follows each slice (e.g. to start its writeback)."""
    total = 0
    for p in pieces:
        done = 0
        while done < p.length:
            n = min(_SLICE if p.fd is not None else len(_ZEROS), p.length - done)
            if p.fd is None:
                write_all(fd, memoryview(_ZEROS)[:n])
            else:
                _copy_range(p.fd, fd, p.offset + done, n)
            done += n
            if on_written is not None:
                on_written(n)
        total += p.length
    return total


def safetensors_header(entries: list, dtype) -> bytes:
    """The header of a safetensors file holding `entries` [(name, shape)] in that order, all of `dtype`: the
    8-byte length, then the JSON padded with spaces to a multiple of 8 (so the data starts aligned)."""
    header, offset = {}, 0
    for name, shape in entries:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor")
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_all(fd: int, data: memoryview) -> None:
    """os.write until every byte is written (large writes may be partial)."""
    view = data.cast("B") if data.format != "B" else data
    while len(view):
        n = os.write(fd, view)
        view = view[n:]
