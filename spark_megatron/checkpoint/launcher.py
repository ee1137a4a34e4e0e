"""Run a conversion on TP x PP ranks: in this process under torchrun, otherwise on spawned gloo ranks.

Rank functions report user errors (bad checkpoint, mapping mismatch, layout) as values rather than raising,
after every rank has agreed on them, so the caller gets the original one-line error instead of a traceback
of a rank failure, and no rank is left waiting in a collective.

Interrupts: SIGINT to the launching process stops the spawned ranks before it returns, SIGINT to a rank stops the
others; either way the CLI then says whether the output had already been published (the atomic rename is the
only way an output appears, so it is then complete) or that nothing was written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from spark_megatron.models.mapping import MappingError
from spark_megatron.models.qwen2 import ModelSpecError
from spark_megatron.models.weights import CheckpointError

USER_ERRORS = (ModelSpecError, MappingError, CheckpointError)
_BY_NAME = {"ModelSpecError": ModelSpecError, "MappingError": MappingError, "CheckpointError": CheckpointError}


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def quiet_known_warnings() -> None:
    """Silence megatron's import-time notices (no Apex / TE on CPU) and torch's DCP deprecation notices, which
    would otherwise repeat once per rank around the progress bar. Call at the start of a rank function."""
    import warnings

    for category in (UserWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*DTensor.*")


def memory_stats() -> dict:
    """This process's current and peak resident memory in bytes, from /proc/self/status (VmRSS, VmHWM). VmHWM
    belongs to this process's own address space; getrusage's ru_maxrss is not usable for spawned ranks because
    Linux carries the parent's high-water mark across fork and exec."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss_bytes" if key == "VmRSS" else "peak_rss_bytes"] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (so a peak measured later excludes what imports touched and freed)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux >= 4.0, or not permitted: the peak then includes the start-up
        pass


def error_value(e: BaseException) -> tuple:
    """A picklable stand-in for a user error; the most specific known base class decides the type."""
    for cls in USER_ERRORS:
        if isinstance(e, cls):
            return ("error", cls.__name__, str(e))
    raise e


def raise_if_error(value) -> None:
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "error":
        raise _BY_NAME[value[1]](value[2])


def agree(status) -> None:
    """Collective: raise on every rank the first rank's user error (status = None or an error_value)."""
    import torch.distributed as dist

    statuses = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, status)
    for s in statuses:
        raise_if_error(s)


def run_layout(fn: Callable, world: int, *args, timeout_s: float = 3600) -> list:
    """Run `fn(rank, world, *args)` on `world` ranks; returns per-rank results (only this rank's under torchrun).

    Results that are error values are re-raised as their user-error type; an interrupted rank raises
    KeyboardInterrupt here (the other ranks have been stopped).
    """
    if under_torchrun():
        env_world = int(os.environ["WORLD_SIZE"])
        if env_world % world:
            raise ModelSpecError(f"torchrun WORLD_SIZE {env_world} is not a multiple of TP x PP = {world}")
        rank = int(os.environ["RANK"])
        results = [None] * env_world
        results[rank] = fn(rank, env_world, *args)
    else:
        from spark_megatron.parallel.spawn import RankInterrupted, run_on_ranks

        try:
            results = run_on_ranks(fn, world, *args, timeout_s=timeout_s)
        except RankInterrupted:
            raise KeyboardInterrupt("a conversion rank was interrupted") from None
    for r in results:
        raise_if_error(r)
    return results


def output_identity(out) -> Optional[tuple]:
    """(device, inode) of an output directory that exists and is not empty, else None: publishing (an atomic
    rename onto `out`) always changes it."""
    if out is None:
        return None
    p = Path(out)
    try:
        if not p.is_dir() or not any(p.iterdir()):
            return None
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def run_cli(fn: Callable, *args, out=None, on_success: Optional[Callable] = None, **kwargs) -> int:
    """Call a conversion entry point; user errors become one `error: ...` line on stderr and exit code 2.

    `out`: the directory the call publishes. After an interrupt (exit code 130) the message says whether it was
    published by this call (then complete) or that nothing was written. `on_success` (e.g. printing what was
    written) runs inside the same guard.
    """
    import sys

    from spark_megatron.parallel.spawn import RankFailure

    quiet_known_warnings()
    before = output_identity(out)
    try:
        fn(*args, **kwargs)
        if on_success is not None:
            on_success()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:  # a bug, not bad input: keep the rank's traceback
        print(f"error: a conversion rank failed\n{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        after = output_identity(out)
        if after is not None and after != before:
            print(f"error: interrupted after {Path(out).absolute()} was published; it is complete (rerun with "
                  f"--force to replace it)", file=sys.stderr)
        else:
            print("error: interrupted (no output written)", file=sys.stderr)
        return 130
    return 0


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '4096' -> bytes (decimal units, as HF's max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            num = t[: -len(suffix)].strip()
            try:
                return int(float(num) * units[suffix])
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ModelSpecError(f"invalid size '{text}' (use e.g. 5GB, 500MB or a byte count)") from None
