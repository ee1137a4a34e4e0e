"""SIGINT to any process of a conversion either leaves no output or reports the output it published.

The converter CLI runs TP2 (a launching process and two spawned ranks). Each case freezes processes with
SIGSTOP where a race would otherwise decide the outcome, so the state at the interrupt is known:
- ranks frozen mid-write, SIGINT to the launcher: no output, no temp dir, "no output written";
- launcher frozen while the ranks publish, then SIGINT: the published output is reported and is complete, and this
  run, started into the directory the interrupted one left empty, is the rerun that must not fail;
- SIGINT to one rank mid-run: whichever way it lands, the message and the directory agree.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import leftovers, tiny_hf_checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


def _interruptible() -> None:
    """SIGINT back to its default in the converter: a shell starts background jobs (a CI runner may run the suite
    as one) with SIGINT ignored, which every child inherits, and Python then installs no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "conversion" / "hf_to_megatron.py"), "--hf",
                             str(tiny_hf_checkpoint("untied")), "--out", str(out), "--tp", "2", "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)


def _wait_for(pred, what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _ranks(pid: int) -> list:
    """The running rank processes of a converter (not multiprocessing's resource tracker; not exited ones)."""
    import psutil

    out = []
    for k in psutil.Process(pid).children():
        try:
            cmd = " ".join(k.cmdline())
        except psutil.Error:  # exited (a zombie until the stopped launcher reaps it)
            continue
        if "spawn_main" in cmd and "resource_tracker" not in cmd:
            out.append(k.pid)
    return out


def _temp_dir(out: Path) -> bool:
    return any(out.parent.glob(f"{out.name}.tmp-*"))


def _finish(proc: subprocess.Popen) -> tuple:
    """(exit code, stdout, the converter's one `error: ...` line; multiprocessing's resource tracker may warn
    after it about the semaphores of the ranks it had to kill)."""
    stdout, stderr = proc.communicate(timeout=300)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return proc.returncode, stdout, errors[0]


def _complete(out: Path) -> bool:
    from spark_megatron.checkpoint.dcp_files import DistcpReader
    from spark_megatron.checkpoint.megatron_format import read_meta

    read_meta(out)
    return bool(DistcpReader(out).meta.state_dict_metadata) and (out / "metadata.json").is_file()


def test_interrupting_the_launcher_while_ranks_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _start(out)
    _wait_for(lambda: _temp_dir(out) and len(_ranks(proc.pid)) == 2, "the ranks to start writing")
    for pid in _ranks(proc.pid):
        os.kill(pid, signal.SIGSTOP)  # mid-write, they cannot publish before the launcher stops them
    proc.send_signal(signal.SIGINT)
    rc, _, last = _finish(proc)
    assert rc == 130 and last == "error: interrupted (no output written)", last
    assert leftovers(out) == []


def test_interrupt_after_the_ranks_published_reports_the_complete_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty directory, as an interrupted run leaves it: the rerun must not fail on it
    proc = _start(out)
    _wait_for(lambda: _temp_dir(out), "the ranks to start writing")
    os.kill(proc.pid, signal.SIGSTOP)
    _wait_for(lambda: (out / "spark_meta.json").exists() and not _temp_dir(out), "the ranks to publish")
    _wait_for(lambda: not _ranks(proc.pid), "the ranks to exit", 60)
    proc.send_signal(signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    rc, _, last = _finish(proc)
    assert rc == 130 and f"interrupted after {out} was published; it is complete" in last, last
    assert _complete(out) and leftovers(out) == [out]


def test_interrupting_one_rank_is_reported_truthfully(tmp_path):
    out = tmp_path / "out"
    proc = _start(out)
    _wait_for(lambda: _temp_dir(out) and len(_ranks(proc.pid)) == 2, "the ranks to start writing")
    os.kill(max(_ranks(proc.pid)), signal.SIGINT)
    rc, stdout, last = _finish(proc)
    assert rc == 130, (rc, stdout, last)
    if out.exists():
        assert "was published; it is complete" in last and _complete(out), last
        assert leftovers(out) == [out]
    else:
        assert last == "error: interrupted (no output written)", last
        assert leftovers(out) == []
