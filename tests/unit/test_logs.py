"""The job's logger (spark_megatron/logs.py): what rank 0's console shows, what only the rank's file gets, and that
a rank without a console loses nothing of its output (C++ writes included) to the terminal."""
import logging
import subprocess
import sys
import textwrap

import pytest

from spark_megatron import logs

pytestmark = pytest.mark.unit


def _record(name, level, msg):
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


@pytest.mark.parametrize("name,level,msg,shown", [
    ("spark_megatron.run_state", logging.INFO, "[warm-up] 20 supervised steps, final loss 2.4", True),
    ("spark_megatron.data.loading", logging.WARNING, "skipped 2 bad records", True),
    ("spark_megatron.metrics", logging.DEBUG, "detail", False),
    ("vllm.v1.core.block_pool", logging.INFO, "Successfully reset prefix cache", False),
    ("vllm.model_executor.model_loader.reload.layerwise", logging.WARNING, "RotaryEmbedding: Failed to load weights",
     False),
    ("vllm.v1.worker.cpu_worker", logging.WARNING, "libtcmalloc is not found in LD_PRELOAD.", False),
    ("vllm.engine", logging.WARNING, "KV cache is too small for max_model_len", True),  # not known: shown
    ("vllm.engine", logging.ERROR, "engine core died", True),
    ("py.warnings", logging.WARNING, "/x/megatron/core/optimizer/__init__.py:24: UserWarning: Transformer Engine "
     "and Apex are not installed. Falling back to Torch optimizers.", False),
    ("py.warnings", logging.WARNING, "/x/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed."
     "reduce_scatter_tensor` is deprecated.", False),
    ("py.warnings", logging.WARNING, "/x/y.py:3: UserWarning: something new", True),
    ("transformers.tokenization_utils", logging.INFO, "loading file vocab.json", False),
])
def test_console_rule(name, level, msg, shown):
    assert logs.on_console(_record(name, level, msg)) is shown


def test_every_harmless_entry_says_why():
    assert all(len(reason) > 20 for _, reason in logs.HARMLESS)


def test_rank0_console_and_file(tmp_path, capsys):
    path = tmp_path / "logs" / "rank0.log"
    logs.configure(0, path)
    try:
        logging.getLogger("spark_megatron.x").info("our line")
        logging.getLogger("vllm.y").info("third-party info")
        logging.getLogger("vllm.y").warning("RotaryEmbedding: Failed to load weights")
        logging.getLogger("other").warning("look at this")
    finally:
        logs.undo()
    err = capsys.readouterr().err.splitlines()
    assert err == ["our line", "warning: other: look at this"]
    text = path.read_text()
    for line in ("our line", "third-party info", "RotaryEmbedding: Failed to load weights", "look at this"):
        assert line in text
    left = logging.getLogger().handlers  # undo removed ours (pytest's own capture handlers stay)
    assert not any(isinstance(h, logs._ConsoleHandler) or getattr(h, "baseFilename", None) == str(path)
                   for h in left)


def test_a_rank_without_console_writes_everything_to_its_file(tmp_path):
    path = tmp_path / "rank1.log"
    code = textwrap.dedent(f"""
        import logging, os, sys
        from spark_megatron import logs
        logs.configure(1, {str(path)!r})
        print("a print")
        os.write(2, b"a C++ line\\n")
        logging.getLogger("spark_megatron.z").info("a log line")
        logs.undo()
        print("after undo")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "after undo\n" and out.stderr == ""
    text = path.read_text()
    assert "a print" in text and "a C++ line" in text and "a log line" in text
