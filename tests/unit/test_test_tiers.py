"""The quick tier and the durations file: a pytest run (here: one small test file, in a subprocess) writes every
test's duration and tier to the durations file; the README prints the quick command next to the full one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_a_run_writes_durations_by_test_and_tier(tmp_path):
    path = tmp_path / "durations.json"
    env = {**os.environ, "SPARK_TEST_DURATIONS": str(path), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/unit/test_layering.py::test_the_checker_sees_function_local_and_relative_imports"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    data = json.loads(path.read_text())
    (entry,) = data["tests"].values()
    assert entry["outcome"] == "passed" and entry["markers"] == ["unit"] and entry["seconds"] > 0
    assert data["seconds_by_marker"]["unit"] == pytest.approx(entry["seconds"], abs=0.1)


def test_readme_prints_the_quick_tier_next_to_the_full_suite():
    blocks = (REPO / "README.md").read_text().split("```")[1::2]  # the code blocks
    commands = [{line.split("#")[0].strip() for line in b.splitlines()} for b in blocks]
    assert any({"bash scripts/test.sh", "bash scripts/test.sh -m unit"} <= c for c in commands)
