"""`spark-megatron launch/plan`: NeMo-Run dry runs render the real job files, bad recipes never get that far."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from spark_megatron.config import load_config
from spark_megatron.launch import cli
from spark_megatron.launch.validation import device_layout

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
R32 = str(ROOT / "configs" / "qwen2_5_vl_32b.yaml")
R7 = str(ROOT / "configs" / "qwen2_5_7b_text.yaml")
FP8 = str(ROOT / "configs" / "qwen2_5_vl_32b_fp8_delayed.yaml")


def _printed_paths(out: str) -> dict:
    keys = {"sbatch script": "sbatch", "torchrun": "torchrun", "recipe": "recipe"}
    found = {}
    for line in out.splitlines():
        for label, key in keys.items():
            if line.startswith(label + " "):
                found[key] = Path(line[len(label):].strip())
    return found


def _flag(argv: list, name: str) -> str:
    return argv[argv.index(name) + 1]


SSH = ["launch.tunnel=ssh", "launch.ssh_host=login", "launch.ssh_user=me", "launch.remote_job_dir=/lustre/jobs"]


@pytest.mark.parametrize("tunnel", [[], SSH], ids=["login-node", "ssh"])
def test_slurm_dryrun_32b_renders_sbatch_with_the_recipes_layout(tunnel, tmp_path, capsys):
    overrides = ["launch.account=acct", "launch.partition=batch", f"output_dir={tmp_path / 'run'}", *tunnel]
    rc = cli.main(["launch", "--config", R32, "--executor", "slurm", "--dryrun", *overrides])
    out = capsys.readouterr().out
    assert rc == 0, out
    paths = _printed_paths(out)
    sbatch = paths["sbatch"].read_text()
    cfg = load_config(R32, overrides)
    lay = device_layout(cfg)
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", sbatch, re.M))
    assert (flags["nodes"], flags["gpus-per-node"], flags["ntasks-per-node"]) == ("2", "8", "1")
    assert (flags["account"], flags["partition"], flags["time"]) == ("acct", "batch", cfg.launch.time_limit)
    srun = next(line for line in sbatch.splitlines() if line.startswith("srun "))
    argv = shlex.split(srun.replace("$", "DOLLAR"))
    assert _flag(argv, "--container-image") == cfg.launch.container_image
    mounts = _flag(argv, "--container-mounts").split(",")
    assert set(cfg.launch.container_mounts) <= set(mounts) and any(m.endswith(":/nemo_run") for m in mounts)
    torchrun = argv[argv.index("torchrun"):]
    nnodes, nproc = int(_flag(torchrun, "--nnodes")), int(_flag(torchrun, "--nproc-per-node"))
    assert (nnodes, nproc) == (2, 8)
    assert nnodes * nproc == lay.tp * lay.pp * lay.dp == 16 and (lay.tp, lay.pp, lay.dp) == (8, 2, 1)
    assert torchrun[torchrun.index("-m") + 1] == "spark_megatron.launch.train_entry"
    # the sbatch script writes the resolved recipe into the job directory mounted at /nemo_run, where the ranks
    # read it: replay that heredoc and load what the ranks would load
    assert _flag(torchrun, "--config") == "/nemo_run/configs/spark_config.yaml"
    job_dir = next(m.split(":")[0] for m in mounts if m.endswith(":/nemo_run"))
    assert job_dir.startswith("/lustre/jobs/" if tunnel else str(tmp_path / "run" / "nemo_run"))
    m = re.search(r"^cat > (\S+) <<'(\w+)'\n(.*?)\n\2$", sbatch, re.M | re.S)
    assert m and m.group(1) == f"{job_dir}/configs/spark_config.yaml"
    assert sbatch.index(m.group(0)) < sbatch.index(srun)
    replayed = tmp_path / "replayed.yaml"
    replayed.write_text(m.group(3))
    assert load_config(str(replayed)) == cfg
    assert paths["torchrun"].read_text().strip().endswith(" ".join(torchrun).replace("DOLLAR", "$"))
    # the rollout layout the trainer builds from the same function: two TP-8 engines, one per node
    engines = "2 engine(s) x TP 8, colocated on ranks [0-7, 8-15]; sleep level 1 while the actor trains"
    assert lay.rollout.describe().startswith(engines) and f"engines        {lay.rollout.describe()}" in out
    assert f"engines      {lay.rollout.describe()}" in (paths["sbatch"].parent / "plan.txt").read_text()


def test_local_dryrun_runs_torchrun_on_one_node(tmp_path, capsys):
    rc = cli.main(["launch", "--config", R7, "--executor", "local", "--dryrun", f"output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    argv = shlex.split(_printed_paths(out)["torchrun"].read_text().splitlines()[-1])
    assert argv[0] == "torchrun" and (_flag(argv, "--nnodes"), _flag(argv, "--nproc-per-node")) == ("1", "8")
    assert load_config(_flag(argv, "--config")) == load_config(R7, [f"output_dir={tmp_path}",
                                                                     "launch.executor=local"])


BAD = [
    ("tp-heads", R7, ["parallel.tensor_model_parallel_size=8", "parallel.data_parallel_size=1"],
     "TP 8 does not divide num_attention_heads 28"),
    ("world", R32, ["launch.nodes=3"], "world size mismatch: 24 actor GPUs"),
    ("unknown-key", R32, ["parallel.tensor_parallel=2"], "unknown config key 'parallel.tensor_parallel'"),
    ("fp8-no-te", FP8, ["launch.container_has_te=false"], "needs Transformer Engine"),
    ("fp8-ampere", FP8, ["launch.gpu_arch=ampere"], "needs a Hopper GPU"),
    ("rollout-tp", R7, ["rollout.tensor_parallel_size=3"], "rollout.tensor_parallel_size 3 does not divide the 8"),
    ("batch", R7, ["optim.train_batch_size=63"], "optim.train_batch_size 63 is not a multiple"),
    ("no-account", R32, ["launch.account=null"], "launch.executor=slurm needs launch.account"),
]


@pytest.mark.parametrize("name,recipe,overrides,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_is_rejected_before_submission(name, recipe, overrides, reason, tmp_path, capsys):
    base = [] if name == "no-account" else ["launch.account=acct"]
    rc = cli.main(["launch", "--config", recipe, "--executor", "slurm", "--dryrun", *base, *overrides,
                   f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 1 and reason in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "run").exists()  # nothing rendered, nothing submitted


def test_unknown_key_in_recipe_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(R7).read_text().replace("  n: 8\n", "  n: 8\n  samples_per_prompt: 8\n"))
    assert cli.main(["plan", "--config", str(bad)]) == 1
    assert "unknown config key 'rollout.samples_per_prompt'" in capsys.readouterr().err


def test_plan_exits_nonzero_when_the_recipe_does_not_fit(capsys):
    assert cli.main(["plan", "--config", R32, "--gpu-memory-gib", "40"]) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "does not fit" in captured.err
    assert cli.main(["plan", "--config", R32]) == 0


def test_help_lists_every_command(capsys):
    assert cli.main([]) == 2
    text = capsys.readouterr().out
    for command in ("train", "plan", "launch", "plot", "convert"):
        assert command in text
    with pytest.raises(SystemExit) as e:
        cli.main(["launch", "--help"])
    assert e.value.code == 0 and "--dryrun" in capsys.readouterr().out
