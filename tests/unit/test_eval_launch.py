"""`spark-megatron launch-eval`: a NeMo-Run dry run renders the evaluation job the way training jobs are rendered
(torchrun, one rank per GPU, the engines split over them), and the suite the job reads is the suite validated on
the launching machine."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from spark_megatron.eval.suite import load_suite
from spark_megatron.launch import cli

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
R7 = str(ROOT / "configs" / "qwen2_5_vl_7b.yaml")
SUITE = str(ROOT / "configs" / "eval" / "spark_vl.yaml")


def _printed(out: str, label: str) -> Path:
    return Path(next(line for line in out.splitlines() if line.startswith(label + " "))[len(label):].strip())


def test_slurm_dryrun_renders_one_rank_per_gpu_with_the_shipped_suite(tmp_path, capsys):
    out_dir = tmp_path / "eval"
    rc = cli.main(["launch-eval", "--config", R7, "--executor", "slurm", "--dryrun", "--model", "/lustre/ckpt/run1",
                   "--suite", SUITE, "--output", str(out_dir), "--self-reflection",
                   "--set", "engine.tensor_parallel_size=4", "--set", "datasets.MathVista.limit=100",
                   "launch.account=acct", "launch.partition=batch"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    sbatch = _printed(printed, "sbatch script").read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", sbatch, re.M))
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("1", "1", "8")  # torchrun: 8
    assert flags["account"] == "acct"
    srun = next(line for line in sbatch.splitlines() if line.startswith("srun "))
    argv = shlex.split(srun.replace("$", "DOLLAR"))
    torchrun = argv[argv.index("torchrun"):]
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "8"  # one rank per GPU: 2 engines x TP 4
    assert torchrun[torchrun.index("-m") + 1] == "spark_megatron.launch.eval_entry"
    assert torchrun[torchrun.index("--suite") + 1] == "/nemo_run/configs/eval_suite.yaml"
    assert torchrun[torchrun.index("--model") + 1] == "/lustre/ckpt/run1"
    assert torchrun[torchrun.index("--output") + 1] == str(out_dir)
    mounts = argv[argv.index("--container-mounts") + 1].split(",")
    assert f"{out_dir}:{out_dir}" in mounts  # results outlive the container
    # the heredoc writes the suite where the job reads it: replay it and load what the job would load
    m = re.search(r"^cat > (\S+) <<'(\w+)'\n(.*?)\n\2$", sbatch, re.M | re.S)
    assert m and m.group(1).endswith("/eval/configs/eval_suite.yaml") and sbatch.index(m.group(0)) < sbatch.index(srun)
    replayed = tmp_path / "replayed.yaml"
    replayed.write_text(m.group(3))
    shipped = load_suite(str(replayed))
    expected = load_suite(SUITE, ["engine.tensor_parallel_size=4", "datasets.MathVista.limit=100",
                                  "self_reflection.enabled=true", "engine.data_parallel_size=2"])
    assert shipped == expected and shipped.dataset("MathVista").limit == 100 and shipped.self_reflection.enabled
    assert "engines        2 x TP 4, one rank per GPU (8 ranks)" in printed


def test_local_dryrun_and_errors(tmp_path, capsys):
    rc = cli.main(["launch-eval", "--config", R7, "--executor", "local", "--dryrun", "--model", "/m", "--suite",
                   SUITE, "--output", str(tmp_path / "e")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    argv = shlex.split(_printed(printed, "torchrun").read_text().splitlines()[-1])
    assert argv[0] == "torchrun" and argv[argv.index("--nproc-per-node") + 1] == "8"
    assert load_suite(argv[argv.index("--suite") + 1]) == load_suite(SUITE, ["engine.data_parallel_size=8"])
    for tp in (16, 3):
        rc = cli.main(["launch-eval", "--config", R7, "--executor", "local", "--dryrun", "--model", "/m", "--suite",
                       SUITE, "--output", str(tmp_path / "e2"), "--set", f"engine.tensor_parallel_size={tp}"])
        err = capsys.readouterr().err
        assert rc == 1 and f"engine.tensor_parallel_size {tp} does not divide launch.gpus_per_node 8" in err
    rc = cli.main(["launch-eval", "--config", R7, "--executor", "local", "--dryrun", "--model", "/m", "--suite",
                   SUITE, "--output", str(tmp_path / "e4"), "--set", "engine.tensor_parallel_size=2",
                   "--set", "engine.data_parallel_size=3"])
    err = capsys.readouterr().err
    assert rc == 1 and "engine.data_parallel_size 3 x engine.tensor_parallel_size 2 != launch.gpus_per_node 8" in err
    rc = cli.main(["launch-eval", "--config", R7, "--executor", "local", "--dryrun", "--model", "/m", "--suite",
                   SUITE, "--output", str(tmp_path / "e3"), "--set", "datasets.Nope.limit=1"])
    assert rc == 1 and "no dataset named 'Nope'" in capsys.readouterr().err
