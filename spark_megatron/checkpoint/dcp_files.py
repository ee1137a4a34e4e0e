"""Megatron dist-checkpoints (torch_dist backend) written and read file by file, without megatron's save path.

What `dist_checkpointing.save` puts on disk, and what this module writes the same way:
- `__<rank>_<i>.distcp`: one `torch.save` record per stored chunk (a ShardedTensor's main replica, with its
  prepended layer axes as size-1 dims) or per ShardedObject (`torch.save([data])` bytes), appended in turn;
- `.metadata`: a pickled `torch.distributed.checkpoint.Metadata`: per key the global size, dtype and chunks
  (offsets, sizes), per chunk the file, byte offset and length;
- `metadata.json` (megatron's CheckpointingConfig: torch_dist v1, common torch v1) and `common.pt` (the non-sharded
  state, empty for a model).
Why: megatron's save copies every tensor once more (preload), forks writer processes and serialises the plan
through them; a converter that already holds each chunk as a view of its input writes it straight to the file.
`dist_checkpointing.load` reads the result at any TP/PP like any other checkpoint of the same model.
Reading goes the other way: each chunk's bytes are located inside its torch.save record (a stored zip entry) and
copied from a mmap of the file into the region of the tensor being assembled.
"""
from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import struct
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from spark_megatron.checkpoint.atomic import Writeback
from spark_megatron.models.hf_files import tensor_bytes, write_pieces
from spark_megatron.models.weights import CheckpointError

METADATA_FILE = ".metadata"
CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
          "common_backend_version": 1}
"""megatron.core.dist_checkpointing's metadata.json for the torch_dist backend (CheckpointingConfig)."""
DCP_VERSION = "1.0.0"
"""torch.distributed.checkpoint's CURRENT_DCP_VERSION, which it stamps on every Metadata it writes."""


@dataclass(frozen=True)
class StoredChunk:
    """One chunk of a global tensor, as a rank wrote it."""

    key: str
    global_shape: tuple
    dtype: torch.dtype
    offsets: tuple
    sizes: tuple
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class StoredObject:
    """One ShardedObject's bytes (`unique_key` is its DCP key)."""

    key: str
    file: str
    offset: int
    length: int


@dataclass
class RankRecord:
    """Everything one rank wrote (picklable: rank 0 gathers these to write the metadata)."""

    chunks: list = field(default_factory=list)
    objects: list = field(default_factory=list)
    bytes_written: int = 0


def exact_alias(t: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous) as a tensor whose storage is exactly its own bytes, without a copy: torch.save writes a
    tensor's whole storage, so a view into a larger buffer would otherwise take the buffer along."""
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype)
    flat = torch.frombuffer(tensor_bytes(t), dtype=torch.uint8)
    return flat.view(t.dtype).view(t.shape)


class _DataRecordFromPieces:
    """The file torch.save writes to, except that its one write of the tensor's bytes (`nbytes` long) is replaced by
    the pieces' bytes: torch.save frames the record (zip headers, pickle) around a placeholder tensor whose pages
    are never touched, the data comes straight from the source mappings."""

    def __init__(self, f, nbytes: int, pieces: list, on_written):
        self._f, self._nbytes, self._pieces, self._on_written = f, nbytes, pieces, on_written
        self.replaced = False

    def write(self, b) -> int:
        n = len(memoryview(b).cast("B"))
        if not self.replaced and n == self._nbytes:
            self.replaced = True
            return write_pieces(self._f.fileno(), self._pieces, self._on_written)
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()


def _save_without_crc(obj, f) -> None:
    """torch.save with its zip CRC32 off (torch's documented `save.compute_crc32` option; the entries say CRC 0).
    Why: the record's data is written by `write_pieces`, not from the placeholder torch.save sees, so torch's CRC
    would describe the placeholder, not the file, and computing it is a full read pass of the placeholder (about
    0.35 s per GB here, a third of a 7B import). torch's reader and dist-checkpointing do not verify it."""
    from torch.utils.serialization import config

    with config.patch({"save.compute_crc32": False}):
        torch.save(obj, f)


class DistcpWriter:
    """This rank's `.distcp` file: chunks appended as torch.save records; their disk writes start as they go."""

    MIN_PIECES_BYTES = 1 << 20
    """Chunks at least this large are written from pieces; smaller ones go through a contiguous tensor."""

    def __init__(self, directory, rank: int):
        self.name = f"__{rank}_0.distcp"
        self._f = open(Path(directory) / self.name, "wb", buffering=0)  # unbuffered: pieces go to the fd too
        self._writeback = Writeback(self._f.fileno())
        self.record = RankRecord()

    def _append(self, write) -> tuple:
        start = self._f.tell()
        write()
        length = self._f.tell() - start
        self.record.bytes_written += length
        self._writeback.wrote(length)
        return start, length

    def _chunk(self, key, global_shape, offsets, shape, dtype, start, length) -> None:
        if len(shape) != len(global_shape) or len(offsets) != len(global_shape):
            raise ValueError(f"{key}: chunk of rank {len(shape)} for a tensor of rank {len(global_shape)}")
        self.record.chunks.append(StoredChunk(key, tuple(global_shape), dtype, tuple(offsets), tuple(shape),
                                              self.name, start, length))

    def add_tensor(self, key: str, global_shape: tuple, offsets: tuple, t: torch.Tensor) -> None:
        """Store `t` as the chunk of global tensor `key` at `offsets` (t has the chunk's full rank: size-1 dims for
        prepended axes included)."""
        data = exact_alias(t if t.is_contiguous() else t.contiguous())
        start, length = self._append(lambda: torch.save(data, self._f))
        self._chunk(key, global_shape, offsets, tuple(t.shape), t.dtype, start, length)

    def add_pieces(self, key: str, global_shape: tuple, offsets: tuple, shape: tuple, dtype: torch.dtype,
                   pieces: list) -> None:
        """Store a chunk whose bytes are `pieces` (mapped file ranges / zeros, in order), without assembling it."""
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if sum(p.length for p in pieces) != nbytes:
            raise ValueError(f"{key}: pieces hold {sum(p.length for p in pieces)} bytes, the chunk {nbytes}")
        placeholder = torch.empty(nbytes, dtype=torch.uint8).view(dtype).view(tuple(shape))
        sink = _DataRecordFromPieces(self._f, nbytes, pieces, self._writeback.wrote)
        start, length = self._append(lambda: _save_without_crc(placeholder, sink))
        if not sink.replaced:
            raise CheckpointError(f"{key}: torch.save did not write the tensor data in one piece")
        self._chunk(key, global_shape, offsets, shape, dtype, start, length)

    def add_object(self, unique_key: str, payload: list) -> None:
        """Store a ShardedObject the way megatron does: `torch.save([data, ...])` bytes."""
        buf = io.BytesIO()
        torch.save(payload, buf)
        start, length = self._append(lambda: self._f.write(buf.getbuffer()))
        self.record.objects.append(StoredObject(unique_key, self.name, start, length))

    def close(self) -> RankRecord:
        """fsync the file; the record is what `write_metadata` needs from this rank."""
        self._writeback.finish()
        self._f.close()
        return self.record

    def abort(self) -> None:
        self._writeback.finish(sync=False)
        self._f.close()


def _check_coverage(key: str, shape: tuple, chunks: list) -> None:
    total = 1
    for d in shape:
        total *= d
    stored, seen = 0, set()
    for c in chunks:
        if c.offsets in seen:
            raise CheckpointError(f"tensor '{key}': chunk at {c.offsets} written twice")
        seen.add(c.offsets)
        n = 1
        for d in c.sizes:
            n *= d
        stored += n
    if stored != total:
        raise CheckpointError(f"tensor '{key}': chunks hold {stored} of its {total} elements")


def write_metadata(directory, records: list) -> None:
    """Rank 0: merge every rank's RankRecord into `.metadata`, then write metadata.json and common.pt."""
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    directory = Path(directory)
    state, storage, by_key = {}, {}, {}
    for rec in records:
        for c in rec.chunks:
            md = state.get(c.key)
            if md is None:
                md = state[c.key] = TensorStorageMetadata(properties=TensorProperties(dtype=c.dtype),
                                                          size=torch.Size(c.global_shape), chunks=[])
            elif tuple(md.size) != c.global_shape or md.properties.dtype != c.dtype:
                raise CheckpointError(f"tensor '{c.key}': ranks disagree on its shape or dtype")
            md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)))
            by_key.setdefault(c.key, []).append(c)
            storage[MetadataIndex(c.key, torch.Size(c.offsets))] = _StorageInfo(c.file, c.offset, c.length)
        for o in rec.objects:
            state[o.key] = BytesStorageMetadata()
            storage[MetadataIndex(o.key)] = _StorageInfo(o.file, o.offset, o.length)
    for key, chunks in by_key.items():
        _check_coverage(key, chunks[0].global_shape, chunks)
    meta = Metadata(state_dict_metadata=state, storage_data=storage, version=DCP_VERSION,
                    storage_meta=StorageMeta(checkpoint_id=str(directory), save_id=str(uuid.uuid4())))
    with open(directory / METADATA_FILE, "wb") as f:
        pickle.dump(meta, f)
    torch.save({}, directory / "common.pt")
    (directory / "metadata.json").write_text(json.dumps(CONFIG))


# ------------------------------------------------------------------------------------------------ reading

class _View(io.RawIOBase):
    """Read-only, seekable window [start, start + length) of a mmap (what zipfile needs to find a record)."""

    def __init__(self, mm, start: int, length: int):
        self._mm, self._start, self._len, self._pos = mm, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self._pos = {0: pos, 1: self._pos + pos, 2: self._len + pos}[whence]
        return self._pos

    def tell(self):
        return self._pos

    def read(self, n=-1):
        end = self._len if n is None or n < 0 else min(self._len, self._pos + n)
        out = self._mm[self._start + self._pos:self._start + end]
        self._pos = max(self._pos, end)
        return out


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _TensorRecord(pickle.Unpickler):
    """Reads the data.pkl of a `torch.save(tensor)` record: storage dtype, offset, size, stride; nothing is
    constructed. Anything else raises, and the caller falls back to torch.load."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return dtype, key, numel


def _local_data(mm, rec_start: int, zi: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored zip entry's bytes (after its local header)."""
    h = rec_start + zi.header_offset
    if mm[h:h + 4] != b"PK\x03\x04":
        raise CheckpointError("bad local header")
    name_len, extra_len = struct.unpack("<HH", mm[h + 26:h + 30])
    return h + 30 + name_len + extra_len


def locate_tensor(mm, start: int, length: int) -> Optional[tuple]:
    """(absolute data offset, dtype, shape, stride) of the tensor a torch.save record holds, or None if the record
    is not a plain single-storage tensor (the caller then uses torch.load)."""
    try:
        zf = zipfile.ZipFile(_View(mm, start, length))
        infos = {zi.filename.split("/", 1)[-1]: zi for zi in zf.infolist()}
        pkl = infos["data.pkl"]
        if pkl.compress_type != zipfile.ZIP_STORED:
            return None
        p = _local_data(mm, start, pkl)
        (dtype, key, numel), offset, size, stride = _TensorRecord(io.BytesIO(mm[p:p + pkl.compress_size])).load()
        data = infos[f"data/{key}"]
        if data.compress_type != zipfile.ZIP_STORED or data.compress_size != numel * dtype.itemsize:
            return None
        return _local_data(mm, start, data) + offset * dtype.itemsize, dtype, size, stride
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError, pickle.UnpicklingError,
            CheckpointError, struct.error):
        return None


class DistcpReader:
    """The chunks of a dist-checkpoint by key, read from mmaps of its `.distcp` files."""

    def __init__(self, directory):
        self.dir = Path(directory)
        try:
            with open(self.dir / METADATA_FILE, "rb") as f:
                self.meta = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise CheckpointError(f"{self.dir}: unreadable dist-checkpoint metadata ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None
        sizes = {(k, tuple(c.offsets)): tuple(c.sizes) for k, md in self.meta.state_dict_metadata.items()
                 for c in getattr(md, "chunks", ())}
        self._chunks = {}
        """key -> [(offsets, sizes, storage info)]"""
        for idx, info in self.meta.storage_data.items():
            if idx.offset is not None:
                off = tuple(idx.offset)
                self._chunks.setdefault(idx.fqn, []).append((off, sizes[(idx.fqn, off)], info))
        self._maps, self._located, self._fds = {}, {}, {}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def shape(self, key: str) -> tuple:
        md = self.meta.state_dict_metadata.get(key)
        if md is None or not hasattr(md, "size"):
            raise CheckpointError(f"{self.dir}: tensor '{key}' is not in the checkpoint")
        return tuple(md.size)

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            self._fds[name] = os.open(self.dir / name, os.O_RDONLY)
        return self._fds[name]

    def _map(self, name: str):
        if name not in self._maps:
            with open(self.dir / name, "rb") as f:
                self._maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[name]

    def _chunk(self, key: str, offsets: tuple, info, sizes: tuple) -> torch.Tensor:
        mm = self._map(info.relative_path)
        where = self._located.get((key, offsets))
        if where is None:
            where = self._located[(key, offsets)] = locate_tensor(mm, info.offset, info.length)
        if where is not None:
            data, dtype, size, stride = where
            t = torch.frombuffer(mm, dtype=dtype, count=max(1, _numel(size)), offset=data)[:_numel(size)]
            if size == sizes and t.view(size).stride() == stride:
                return t.view(size)
        loaded = torch.load(_View(mm, info.offset, info.length), map_location="cpu", weights_only=True)
        return loaded.reshape(sizes)

    def _stored(self, key: str, c_off: tuple, info, c_size: tuple) -> Optional[tuple]:
        """(data offset, dtype) of a chunk stored contiguously in its record, else None."""
        mm = self._map(info.relative_path)
        where = self._located.get((key, c_off))
        if where is None:
            where = self._located[(key, c_off)] = locate_tensor(mm, info.offset, info.length)
        if where is None:
            return None
        data, dtype, size, stride = where
        if size != c_size or torch.empty(size, device="meta").stride() != stride:
            return None
        return data, dtype

    def row_pieces(self, key: str, lead: tuple, row0: int, nrows: int, dtype: torch.dtype) -> Optional[list]:
        """Rows [row0, row0 + nrows) of global tensor `key` at leading (prepended) indices `lead`, as Pieces of the
        chunk files, if every such row is stored whole and contiguous in `dtype`; else None."""
        from spark_megatron.models.hf_files import Piece

        shape = self.shape(key)
        k = len(lead)
        rest = shape[k + 1:]
        row_bytes = _numel(rest) * dtype.itemsize
        pieces, r = [], row0
        while r < row0 + nrows:
            found = None
            for c_off, c_size, info in self._chunks.get(key, []):
                inside = all(o <= i < o + n for i, o, n in zip(lead, c_off[:k], c_size[:k]))
                if inside and c_off[k] <= r < c_off[k] + c_size[k] and c_size[k + 1:] == rest \
                        and not any(c_off[k + 1:]):
                    found = (c_off, c_size, info)
                    break
            if found is None:
                return None
            c_off, c_size, info = found
            stored = self._stored(key, c_off, info, c_size)
            if stored is None or stored[1] != dtype:
                return None
            flat = 0
            for i, o, n in zip(lead, c_off[:k], c_size[:k]):
                flat = flat * n + (i - o)
            take = min(row0 + nrows, c_off[k] + c_size[k]) - r
            first = flat * c_size[k] + (r - c_off[k])
            pieces.append(Piece(self._fd(info.relative_path), stored[0] + first * row_bytes, take * row_bytes))
            r += take
        return pieces

    def read_into(self, key: str, offsets: tuple, out: torch.Tensor) -> None:
        """Fill `out` with the region of global tensor `key` that starts at `offsets`; `out` may lack the
        leading (prepended, size-1) axes. Each overlapping chunk is copied straight from its file's mapping."""
        shape = self.shape(key)
        lead = len(shape) - out.dim()
        region = (1,) * lead + tuple(out.shape)
        dst_all = out.view(region)
        covered = 0
        for c_off, c_size, info in self._chunks.get(key, []):
            lo = [max(a, b) for a, b in zip(offsets, c_off)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, region, c_off, c_size)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            src = self._chunk(key, c_off, info, c_size)
            src = src[tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, c_off))]
            dst = dst_all[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, offsets))]
            dst.copy_(src)
            covered += _numel([h - l for l, h in zip(lo, hi)])
            self._release(info)
        if covered != _numel(region):
            raise CheckpointError(f"{self.dir}: tensor '{key}' region at {tuple(offsets)} of size {region} is "
                                  f"only partly stored ({covered} of {_numel(region)} elements)")

    def _release(self, info) -> None:
        mm = self._maps.get(info.relative_path)
        if mm is None:
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        end = min(len(mm), info.offset + info.length)
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


