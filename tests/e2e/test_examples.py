"""The scripts under examples/ run as documented: the Slurm example renders the 32B job from its environment
variables, and export_and_serve turns a Megatron checkpoint into an HF directory that matches it and answers
with test-time self-reflection on real vLLM (its summary recomputed here from the per-prompt trace)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _env(**extra) -> dict:
    env = dict(os.environ, PY=sys.executable, **extra)
    env.setdefault("WANDB_MODE", "offline")
    return env


def test_slurm_example_renders_the_32b_job_from_its_variables(tmp_path):
    out = tmp_path / "run"
    env = _env(ACCOUNT="proj42", PARTITION="h100", CONTAINER="/lustre/img.sqsh", MODEL="/lustre/m/32b",
               DATA="/lustre/d/train.jsonl", OUTPUT=str(out), MOUNTS="/lustre:/lustre")
    res = subprocess.run(["bash", str(ROOT / "examples/slurm_qwen2_5_vl_32b.sh")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "dry run: nothing submitted" in res.stdout
    sbatch_path = Path(re.search(r"^sbatch script\s+(\S+)$", res.stdout, re.M).group(1))
    sbatch = sbatch_path.read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", sbatch, re.M))
    assert (flags["account"], flags["partition"], flags["nodes"], flags["gpus-per-node"]) == \
        ("proj42", "h100", "2", "8")
    srun = next(line for line in sbatch.splitlines() if line.startswith("srun "))
    assert "--container-image /lustre/img.sqsh" in srun and "/lustre:/lustre" in srun
    assert "--nnodes 2 --nproc-per-node 8" in srun
    recipe = (sbatch_path.parent / "spark_config.yaml").read_text()
    assert "/lustre/m/32b" in recipe and "/lustre/d/train.jsonl" in recipe


@pytest.mark.vllm
def test_export_and_serve_example_on_a_converted_checkpoint(tmp_path):
    from spark_megatron.models.tiny_checkpoint import write_tiny_qwen2
    from spark_megatron.verify import is_correct

    hf_dir = write_tiny_qwen2(tmp_path / "hf_in")
    meg = tmp_path / "meg"
    conv = subprocess.run([sys.executable, "conversion/hf_to_megatron.py", "--hf", str(hf_dir), "--out", str(meg),
                           "--tp", "2", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]
    out = tmp_path / "hf_out"
    res = subprocess.run(["bash", str(ROOT / "examples/export_and_serve.sh"), str(meg), str(out)],
                         env=_env(LIMIT="6", ENGINE="vllm"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert re.search(r"^PASS: worst max abs diff", res.stdout, re.M), res.stdout[-2000:]
    summary = json.loads(next(line for line in res.stdout.splitlines() if line.startswith('{"prompts"')))
    rows = [json.loads(line) for line in (out / "self_reflection.jsonl").read_text().splitlines()]
    assert summary["prompts"] == len(rows) == 6
    for r in rows:
        stages = [t["stage"] for t in r["trace"]]
        assert stages[0] == "answer" and stages.count("retry") == r["retries"] <= 2
        last = [t for t in r["trace"] if t["stage"] in ("answer", "retry")][-1]
        assert last["extracted"] == r["final_answer"]
    final = sum(is_correct(r["final_answer"], r["ground_truth"]) for r in rows) / len(rows)
    assert summary["final_accuracy"] == pytest.approx(final)
    assert summary["mean_retries"] == pytest.approx(sum(r["retries"] for r in rows) / len(rows))
