"""What a rank is doing, written where the process that spawned it can read it after the rank died.

A rank that is killed (SIGKILL, out of memory) cannot say why it stopped; the rank spawner (`parallel/spawn.py`)
can still tell which rank died and what it was doing at the time: the rank records each potentially long
operation (an engine's generate, a weight push, ...) in `<SPARK_RANK_STATUS_DIR>/rank<N>` before it starts and
clears it after. A rank that gives up on a hung operation records `hung: <one line>` and exits with `HUNG_EXIT`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

STATUS_DIR_ENV = "SPARK_RANK_STATUS_DIR"
HUNG_EXIT = 75
"""Exit status of a rank that gave up on an operation past its deadline."""


def status_path(rank: int) -> Optional[Path]:
    d = os.environ.get(STATUS_DIR_ENV)
    return Path(d) / f"rank{rank}" if d else None


def write_status(path: Optional[Path], text: str) -> None:
    """Replace the status atomically (the spawner never reads half a line); '' clears it."""
    if path is None:
        return
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass


def read_status(directory, rank: int) -> str:
    """'' | 'busy: <what>' | 'hung: <one line>'."""
    try:
        return (Path(directory) / f"rank{rank}").read_text().strip()
    except OSError:
        return ""
