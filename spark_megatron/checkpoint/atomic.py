"""All-or-nothing output directories.

Conversions and checkpoints are written into a sibling `<out>.tmp-<pid>`, flushed to disk, and renamed onto
`<out>` only when complete, so a crash, a bad input found half way, or a kill never leaves a directory that looks
like a finished checkpoint. A temp dir whose writer process is gone is stale and may be removed by anyone.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from spark_megatron.models.weights import CheckpointError

_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


class OutputExistsError(CheckpointError):
    """The output directory already holds files and overwriting was not requested."""


def check_output_dir(out, force: bool = False) -> Path:
    """Fail early (before any work) when `out` cannot be written; returns it as an absolute Path."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out}: output directory exists and is not empty (pass --force to replace it)")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: parent directory of the output does not exist")
    if not os.access(out.parent, os.W_OK):
        raise CheckpointError(f"{out.parent}: not writable")
    return out


def temp_dir_for(out, pid: Optional[int] = None) -> Path:
    out = Path(out).absolute()
    return out.with_name(f"{out.name}{_TMP_TAG}{os.getpid() if pid is None else pid}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed writer that its parent has not reaped yet is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temps(out) -> list:
    """Delete `<out>.tmp-<pid>` / `<out>.old-<pid>` siblings whose writer process no longer exists."""
    out = Path(out).absolute()
    removed = []
    if not out.parent.is_dir():
        return removed
    for tag in (_TMP_TAG, _OLD_TAG):
        for p in out.parent.glob(f"{out.name}{tag}*"):
            suffix = p.name[len(out.name) + len(tag):]
            if suffix.isdigit() and not _pid_alive(int(suffix)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


class Writeback:
    """Starts the disk write of a file's newly written bytes every `every` bytes (sync_file_range with
    SYNC_FILE_RANGE_WRITE: asynchronous, no journal commit), so the disk works while the writer goes on and the
    final fsync has little left; without sync_file_range (non-Linux) only the final fsync remains."""

    def __init__(self, fd: int, every: int = 64 << 20):
        self.fd, self.every = fd, every
        self._start = self._pos = os.lseek(fd, 0, os.SEEK_CUR)

    def wrote(self, nbytes: int) -> None:
        self._pos += nbytes
        if self._pos - self._start >= self.every:
            _sync_file_range(self.fd, self._start, self._pos - self._start)
            self._start = self._pos

    def finish(self, sync: bool = True) -> None:
        """fsync everything written (skipped when the file is being abandoned)."""
        if sync:
            os.fsync(self.fd)


def _sync_file_range(fd: int, offset: int, nbytes: int) -> None:
    global _SFR
    if _SFR is None:
        import ctypes

        fn = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _SFR = fn or False
    if _SFR:
        _SFR(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure only means the final fsync does the work


_SFR = None


def fsync_tree(path) -> None:
    """Flush every file and directory entry under `path` so the rename publishes durable data."""
    path = Path(path)
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(path) -> None:
    """Make a rename or new entry in directory `path` durable."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files are already flushed
        pass
    finally:
        os.close(fd)


def commit(tmp, out, force: bool = False) -> Path:
    """Publish a finished temp dir as `out` (replacing an existing `out` only with force)."""
    tmp, out = Path(tmp), Path(out).absolute()
    fsync_tree(tmp)
    old = None
    if out.exists():
        if any(out.iterdir()) and not force:
            raise OutputExistsError(f"{out}: appeared while writing; not replaced (pass --force to replace it)")
        old = out.with_name(f"{out.name}{_OLD_TAG}{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def discard(tmp) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out, force: bool = False) -> Iterator[Path]:
    """`with atomic_output_dir(out) as tmp:` write into tmp; published as `out` only if the block succeeds."""
    out = check_output_dir(out, force)
    remove_stale_temps(out)
    tmp = temp_dir_for(out)
    discard(tmp)
    tmp.mkdir()
    try:
        yield tmp
        commit(tmp, out, force)
    except BaseException:
        discard(tmp)
        raise
