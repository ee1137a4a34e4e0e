"""NeMo-Run experiments for a recipe: torchrun under a LocalExecutor (one node) or a SlurmExecutor (Pyxis).

Every rank runs `python -m spark_megatron.launch.train_entry --config <resolved recipe>`. On Slurm the resolved
recipe (overrides applied) is embedded in the sbatch script, which writes it into the NeMo-Run job directory
(mounted at /nemo_run in the container) before starting the ranks: the job depends neither on the launching
machine's files nor on the tunnel (local or SSH). Locally the ranks read the copy under <output_dir>/launch/. A
plain `run.Packager` ships no code: the container image carries the installed package (see Dockerfile).

`--dryrun` renders everything NeMo-Run would submit without submitting: the sbatch script (Slurm) and the exact
torchrun command are copied into `<output_dir>/launch/<experiment id>/` next to the resolved recipe.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from spark_megatron.config import to_dict

TRAIN_MODULE = "spark_megatron.launch.train_entry"
TASK_NAME = "train"
CONFIG_NAME = "spark_config.yaml"
CONFIG_EOF = "SPARK_RECIPE_EOF"
DEFAULT_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # Megatron's TP/SP overlap relies on in-order kernel launch
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class LaunchError(RuntimeError):
    """NeMo-Run is missing or the experiment could not be built / submitted."""


@dataclass
class JobSpec:
    """What the job runs. The default is training; `spark-megatron launch-eval` submits the evaluation."""

    task: str = TASK_NAME
    """NeMo-Run task name (the sbatch file is <task>_sbatch.sh)."""
    module: str = TRAIN_MODULE
    """`python -m` entry point every task runs."""
    config_flag: str = "--config"
    """The entry point's flag for the config file the job ships."""
    config_name: str = CONFIG_NAME
    config_yaml: Optional[str] = None
    """The shipped config (None = the resolved recipe)."""
    extra_args: tuple = ()
    ntasks_per_node: Optional[int] = None
    """Processes per node (None = launch.gpus_per_node, one rank per GPU)."""


@dataclass
class LaunchArtifacts:
    """What `launch` wrote (and, unless dry-run, submitted)."""

    experiment_id: str
    experiment_dir: Path
    """NeMo-Run's experiment directory (job metadata, the original sbatch script)."""
    artifacts_dir: Path
    """<output_dir>/launch/<experiment id>: copies for the user."""
    resolved_config: Path
    command: str
    """The torchrun command every node runs."""
    command_file: Path
    sbatch_script: Optional[Path]
    """Slurm only: copy of the rendered sbatch script."""
    submitted: bool


def nemo_run():
    """Import nemo_run on demand (only launch code paths need it)."""
    try:
        import nemo_run as run
    except ImportError as e:
        raise LaunchError(f"`spark-megatron launch` needs nemo-run (pip install 'spark_megatron[launch]' or "
                          f"nemo-run==0.11.1): {e}") from None
    return run


def job_env(cfg) -> dict:
    env = dict(DEFAULT_ENV)
    env["WANDB_MODE"] = cfg.logging.wandb_mode
    env.update({str(k): str(v) for k, v in (cfg.launch.env or {}).items()})
    return env


def container_mounts(cfg) -> list:
    """The recipe's mounts plus the output directory when no mount covers it (results must outlive the
    container)."""
    mounts = list(cfg.launch.container_mounts or [])
    out = cfg.output_dir
    dsts = [m.split(":")[1] for m in mounts if ":" in m]
    if os.path.isabs(out) and not any(out == d or out.startswith(d.rstrip("/") + "/") for d in dsts):
        mounts.append(f"{out}:{out}")
    return mounts


def _tunnel(run, lc, base_dir: Path):
    if lc.tunnel == "ssh":
        return run.SSHTunnel(host=lc.ssh_host, user=lc.ssh_user, job_dir=lc.remote_job_dir,
                             identity=lc.ssh_identity)
    # job_dir = NeMo-Run's experiments root, so the tunnel's job paths equal the local experiment directory
    return run.LocalTunnel(job_dir=str(base_dir / "experiments"))


def recipe_setup_lines(recipe_yaml: str, job_dir_on_cluster: str, name: str = CONFIG_NAME) -> str:
    """sbatch lines that write the resolved recipe where the ranks read it (a quoted heredoc: no expansion)."""
    if CONFIG_EOF in recipe_yaml:
        raise LaunchError(f"the recipe contains the heredoc terminator {CONFIG_EOF}")
    target = f"{job_dir_on_cluster}/configs/{name}"
    return (f"mkdir -p {shlex.quote(job_dir_on_cluster)}/configs\n"
            f"cat > {shlex.quote(target)} <<'{CONFIG_EOF}'\n{recipe_yaml.rstrip()}\n{CONFIG_EOF}")


def build_executor(run, cfg, base_dir: Path, setup_lines: Optional[str] = None,
                   ntasks_per_node: Optional[int] = None):
    """run.LocalExecutor or run.SlurmExecutor with the torchrun launcher for this recipe."""
    lc = cfg.launch
    ntasks = ntasks_per_node or lc.gpus_per_node
    if lc.executor == "local":
        # torchrun and python from this interpreter's environment, activated or not
        env = job_env(cfg) | {"PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
        return run.LocalExecutor(ntasks_per_node=ntasks, launcher="torchrun", env_vars=env)
    return run.SlurmExecutor(
        account=lc.account, partition=lc.partition, job_name_prefix=f"{lc.job_name}-", time=lc.time_limit,
        nodes=lc.nodes, ntasks_per_node=ntasks, gpus_per_node=lc.gpus_per_node, qos=lc.qos,
        exclusive=True if lc.exclusive else None, container_image=lc.container_image,
        container_mounts=container_mounts(cfg), env_vars=job_env(cfg), tunnel=_tunnel(run, lc, base_dir),
        packager=run.Packager(), launcher="torchrun", setup_lines=setup_lines)


def cluster_job_dir(cfg, base_dir: Path, title: str, exp_id: str, task: str = TASK_NAME) -> str:
    """The task's job directory as the cluster sees it (what NeMo-Run mounts at /nemo_run)."""
    root = cfg.launch.remote_job_dir if cfg.launch.tunnel == "ssh" else str(base_dir / "experiments")
    return os.path.join(root, title, exp_id, task)


def torchrun_command_from_sbatch(script: str) -> str:
    """The torchrun part of the sbatch script's srun line."""
    for line in script.splitlines():
        if line.startswith("srun ") and " torchrun " in line:
            cmd = line[line.index("torchrun "):]
            return cmd.split(" & pids[")[0].strip()
    raise LaunchError("the rendered sbatch script has no srun ... torchrun line")


@contextlib.contextmanager
def _detached_stdin():
    """NeMo-Run packages through `invoke`, which mirrors our stdin into its shell commands: with a pipe or a
    captured stdin (CI, pytest) that read fails or blocks. The launcher never needs stdin, so give it /dev/null."""
    try:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        interactive = False
    if interactive:
        yield
        return
    saved = sys.stdin
    with open(os.devnull) as null:
        sys.stdin = null
        try:
            yield
        finally:
            sys.stdin = saved


def _experiment_id(cfg) -> str:
    # NeMo-Run's LocalTunnel recovers the title as id.rpartition('_')[0]: no '_' after the title
    return f"{cfg.launch.job_name}_{time.strftime('%Y%m%d-%H%M%S')}"


def launch(cfg, dryrun: bool = True, experiment_id: Optional[str] = None,
           job: Optional[JobSpec] = None) -> LaunchArtifacts:
    """Build the experiment; write the resolved recipe, sbatch script and torchrun command; submit unless
    `dryrun`. The recipe must already be validated (see validation.validate_recipe)."""
    job = job or JobSpec()
    run = nemo_run()
    exp_id = experiment_id or _experiment_id(cfg)
    title = cfg.launch.job_name
    base_dir = Path(cfg.launch.nemo_run_dir or Path(cfg.output_dir) / "nemo_run").absolute()
    exp_dir = base_dir / "experiments" / title / exp_id
    resolved_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    artifacts_dir = Path(cfg.output_dir).absolute() / "launch" / exp_id
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    resolved = artifacts_dir / CONFIG_NAME
    resolved.write_text(resolved_yaml)
    shipped_yaml = resolved_yaml if job.config_yaml is None else job.config_yaml
    shipped = artifacts_dir / job.config_name
    shipped.write_text(shipped_yaml)
    if cfg.launch.executor == "slurm":
        from nemo_run.config import RUNDIR_NAME

        setup = recipe_setup_lines(shipped_yaml, cluster_job_dir(cfg, base_dir, title, exp_id, job.task),
                                   job.config_name)
        # inside the container the job directory is /nemo_run (NeMo-Run rewrites it without a container)
        config_arg = f"/{RUNDIR_NAME}/configs/{job.config_name}"
    else:
        setup, config_arg = None, str(shipped)
    script = run.Script(path=job.module, entrypoint="python", m=True,
                        args=[job.config_flag, config_arg, *job.extra_args])
    executor = build_executor(run, cfg, base_dir, setup, job.ntasks_per_node)
    with _detached_stdin(), run.Experiment(title, executor=executor, id=exp_id, base_dir=str(base_dir),
                                           clean_mode=dryrun) as exp:
        exp.add(script, name=job.task)
        if dryrun:
            exp.dryrun(log=False, delete_exp_dir=False)
        else:
            exp.run(detach=cfg.launch.executor == "slurm", tail_logs=cfg.launch.executor == "local")
        job_handle = exp.jobs[0]
    return _collect(cfg, exp_id, exp_dir, artifacts_dir, resolved, job_handle, submitted=not dryrun, task=job.task)


def _collect(cfg, exp_id, exp_dir: Path, artifacts_dir: Path, resolved: Path, job, submitted: bool,
             task: str = TASK_NAME):
    sbatch_copy = None
    if cfg.launch.executor == "slurm":
        rendered = exp_dir / f"{task}_sbatch.sh"
        if not rendered.is_file():
            raise LaunchError(f"NeMo-Run did not render {rendered}")
        sbatch_copy = artifacts_dir / f"{cfg.launch.job_name}.sbatch"
        shutil.copyfile(rendered, sbatch_copy)
        command = torchrun_command_from_sbatch(rendered.read_text())
    else:
        role = job._executable.roles[0]
        command = shlex.join([role.entrypoint, *role.args])
    command_file = artifacts_dir / "torchrun.sh"
    command_file.write_text("#!/bin/bash\n# the command every node runs (rendered by NeMo-Run)\n" + command + "\n")
    return LaunchArtifacts(experiment_id=exp_id, experiment_dir=exp_dir, artifacts_dir=artifacts_dir,
                           resolved_config=resolved, command=command, command_file=command_file,
                           sbatch_script=sbatch_copy, submitted=submitted)
