"""`scripts/gpu_check.sh --dry-run` on CPU: the prepared GPU check must keep working where CI can run it.

One run (about a minute on 2 idle cores): the wheel list against the GPU paths' imports, the megatron-core API
check, the gpu-marked tests collecting and skipping cleanly, bench/actor_step.py at tiny size (Megatron actor and
HF step on the same weights and tokens), `spark-megatron plan` against the memory the actor allocated, and the
merged JSON against its schema."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_gpu_check_dry_run(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_report

    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert gpu_report.validate(doc, gpu_report.SCHEMA) == []
    assert doc["dry_run"] and doc["ok"]
    assert [s["name"] for s in doc["steps"]] == ["d_imports", "d_mcore_api", "a_gpu_tests", "b_actor_tiny",
                                                 "c_planner"]
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_check.json", "gpu_check.txt", "gpu_check_logs.txt"}
    # without CUDA every gpu-marked test is collected and skipped, none errors
    t = doc["gpu_tests"]
    assert t["skipped"] >= 5 and t["passed"] == t["failed"] == t["errors"] == 0
    # same weights and tokens on both sides: the first step's loss and gradient norm agree
    (bench,) = doc["actor_step"]
    assert bench["model"]["name"] == "tiny" and bench["megatron"]["layer_spec"] == "local"
    assert bench["ratio"]["loss_rel_diff"] < 1e-2 and bench["ratio"]["grad_norm_rel_diff"] < 5e-2
    assert bench["megatron"]["skipped_steps"] == 0
    # the planner's state bytes are what megatron allocated (DDP buffers, optimizer shards), to the byte
    (plan,) = doc["planner"]
    assert plan["rc"] == 0 and plan["error"] is None
    for part in ("params", "grads", "optimizer"):
        assert plan["components"][part]["rel_error"] == 0.0, plan["components"]
    assert plan["components"]["activations"]["measured"] is None  # no allocator readings on CPU
    assert doc["imports"]["ok"] and doc["mcore_api"]["missing"] == []
    assert "planner vs measured" in (tmp_path / "gpu_check.txt").read_text()


def test_gpu_branch_plumbing_on_cpu(tmp_path):
    """The accelerator branch of the script (what CI cannot run): a missing wheel directory is one line, exit 2;
    `--installed --only` runs just the named step and still writes a valid report."""
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_report

    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    bad = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "none")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "holds no .whl files" in bad.stderr
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--installed", "--only", "d_mcore_api", "--out",
                           str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert gpu_report.validate(doc, gpu_report.SCHEMA) == []
    assert not doc["dry_run"] and doc["ok"] and [s["name"] for s in doc["steps"]] == ["d_mcore_api"]
    assert doc["mcore_api"]["missing"] == [] and doc["gpu_tests"] is None and doc["actor_step"] == []
