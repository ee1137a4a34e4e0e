"""Kill a run with SIGKILL in the middle of a checkpoint write; `--resume` continues from the last complete
checkpoint, and two resumed runs from the same checkpoint produce identical metrics for the next steps."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1",
       "WANDB_MODE": "offline", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(out_dir, steps, resume=False):
    cmd = [sys.executable, "-m", "spark_megatron.launch.cli", "train", "--config", "configs/tiny_cpu.yaml",
           f"output_dir={out_dir}", f"total_steps={steps}", "warmup_sft_steps=3", "rollout.n=4",
           "data.prompts_per_step=8", "optim.train_batch_size=32",  # 32 rollouts: one full optimizer batch
           "checkpoint.save_interval=1", "checkpoint.keep_last=3", "logging.progress=false",
           "logging.wandb_project=null", "logging.tensorboard=false"]
    return cmd + (["--resume"] if resume else [])


def _rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]


def _kill_during_checkpoint(out_dir: Path, step: int, timeout_s: float = 600) -> None:
    """Start a run and SIGKILL it while the checkpoint of `step` is being written (its temp dir exists)."""
    proc = subprocess.Popen(_cmd(out_dir, 6), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = out_dir / "checkpoints"
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"run ended (rc {proc.returncode}) before checkpoint {step} was written")
            temps = [p for p in ckpts.glob(f"step_{step:06d}*") if ".tmp-" in p.name] if ckpts.exists() else []
            if temps:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.02)
        pytest.fail("checkpoint temp dir never appeared")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigkill_mid_checkpoint_then_resume_is_deterministic(tmp_path):
    from spark_megatron.checkpoint.train_state import find_latest_complete

    run = tmp_path / "run"
    _kill_during_checkpoint(run, step=3)
    latest = find_latest_complete(run / "checkpoints")
    assert latest is not None and latest.name == "step_000002", latest  # the torn step-3 write is ignored
    copies = [tmp_path / "a", tmp_path / "b"]
    for c in copies:
        shutil.copytree(run, c)
    for c in copies:
        subprocess.run(_cmd(c, 4, resume=True), cwd=ROOT, env=ENV, check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = _rows(copies[0]), _rows(copies[1])
    assert [r["step"] for r in a] == [1, 2, 3, 4]  # step 3 of the killed run was dropped and redone
    strip = ("time/", "perf/")  # wall-clock based
    for ra, rb in zip(a[2:], b[2:]):
        ka = {k: v for k, v in ra.items() if not k.startswith(strip)}
        kb = {k: v for k, v in rb.items() if not k.startswith(strip)}
        assert ka == kb, "two resumes from one checkpoint diverged"
