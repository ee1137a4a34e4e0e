"""Checks a recipe must pass before anything is planned or submitted, each failing with the reason.

Covered: the device layout (world size = TP x PP x DP, the rollout engines from `rollout.layout.rollout_layout`,
the function the trainer builds its engines from, rollout TP dividing the model's heads),
the model's divisibility by TP/PP (the model family's own check, so the planner rejects exactly what the model
builder would), batch sizes that split into micro-batches, the precision target (FP8 only on Hopper with
Transformer Engine, sequence parallelism only with TE) and the executor settings Slurm needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the model modules import torch; the layout and batch checks run before it is loaded
    from spark_megatron.launch.architecture import ModelArchitecture

FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
FP8_ARCHS = ("hopper",)
"""Architectures the FP8 recipes are written for (TE FP8 GEMMs on sm90)."""
GPU_ARCHS = ("hopper", "blackwell", "ada", "ampere", "cpu")
EXECUTORS = ("local", "slurm")
TUNNELS = ("local", "ssh")
PARAM_DTYPES = ("float32", "bfloat16", "float16")
REPO_ROOT = Path(__file__).resolve().parents[2]


class RecipeError(ValueError):
    """A recipe that cannot run as configured; the message lists every reason found."""


@dataclass(frozen=True)
class DeviceLayout:
    """How the job's GPUs are split between the actor's TP x PP x DP grid and the vLLM engines (colocated: every
    GPU hosts an actor rank and its part of an engine)."""

    world: int
    """nodes x gpus_per_node."""
    actor_world: int
    tp: int
    pp: int
    dp: int
    vpp: Optional[int]
    rollout_tp: int
    rollout_gpus: int
    """GPUs hosting vLLM (all of them when colocated)."""
    engines: int
    """vLLM engines = rollout_gpus / rollout_tp."""
    microbatches: int
    """Micro-batches per optimizer step per DP rank = train_batch_size / (micro_batch_size x DP)."""
    colocated: bool
    rollout: object = None
    """The trainer's `RolloutLayout` for this job (engine ranks, sleep, push mode)."""


def resolve_architecture(cfg, model_config: Optional[str] = None) -> ModelArchitecture:
    """The model facts for planning: `model_config` (CLI) > model.hf_path if readable > launch.model_config."""
    from spark_megatron.launch.architecture import ModelArchitecture
    from spark_megatron.models.qwen2 import ModelSpecError

    candidates = []
    if model_config:
        candidates.append(("--model-config", model_config))
    hf = cfg.model.hf_path
    if hf and not hf.startswith("tiny:") and (Path(hf) / "config.json").is_file():
        candidates.append(("model.hf_path", hf))
    if cfg.launch.model_config:
        candidates.append(("launch.model_config", cfg.launch.model_config))
    if not candidates and hf.startswith("tiny:"):
        return _tiny_architecture(hf, cfg.seed)
    if not candidates:
        raise RecipeError(f"no model config to plan with: model.hf_path '{hf}' has no config.json here; pass "
                          "--model-config configs/models/<model>.json or set launch.model_config")
    where, path = candidates[0]
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p  # recipes name configs/models/... relative to the repository
    try:
        return ModelArchitecture.from_path(p)
    except ModelSpecError as e:
        raise RecipeError(f"{where}: {e}") from None


def _tiny_architecture(hf_path: str, seed: int) -> ModelArchitecture:
    """`tiny:*` recipes: write the tiny model the trainer would build (its vocab comes from a locally trained
    tokenizer) into a scratch directory and read its config."""
    import tempfile

    from spark_megatron.launch.architecture import ModelArchitecture
    from spark_megatron.launch.train_entry import TINY_KINDS, write_tiny

    kind = hf_path.split(":", 1)[1]
    if kind not in TINY_KINDS:
        raise RecipeError(f"model.hf_path '{hf_path}': tiny models are " + ", ".join(f"tiny:{k}" for k in TINY_KINDS))
    with tempfile.TemporaryDirectory() as d:
        write_tiny(kind, d, seed)
        arch = ModelArchitecture.from_path(d)
    return ModelArchitecture(arch.architecture, arch.text, arch.vision, hf_path, arch.hf_config)


def device_layout(cfg) -> DeviceLayout:
    """Derive the layout; raises RecipeError when the GPUs cannot be split as configured."""
    from spark_megatron.rollout.layout import LayoutError, rollout_layout

    par, lc, ro = cfg.parallel, cfg.launch, cfg.rollout
    tp, pp, dp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.data_parallel_size
    problems = []
    if min(tp, pp, dp, ro.tensor_parallel_size, lc.nodes, lc.gpus_per_node) < 1:
        raise RecipeError("TP, PP, DP, rollout TP, launch.nodes and launch.gpus_per_node must all be >= 1")
    world = lc.nodes * lc.gpus_per_node
    if lc.rollout_gpus:
        problems.append(f"launch.rollout_gpus {lc.rollout_gpus}: dedicated rollout GPUs are not built (engines run "
                        "colocated on every GPU); set launch.rollout_gpus=0")
    if world != tp * pp * dp:
        problems.append(f"world size mismatch: {world} actor GPUs (launch.nodes {lc.nodes} x gpus_per_node "
                        f"{lc.gpus_per_node}) is not TP {tp} x PP {pp} x DP {dp} (parallel.data_parallel_size) = "
                        f"{tp * pp * dp}")
    rollout = None
    if world == tp * pp * dp or not ro.colocate:
        try:
            rollout = rollout_layout(world, tp, pp, ro.tensor_parallel_size, ro.colocate, ro.sleep_level,
                                     on_gpu=lc.gpu_arch != "cpu", engine=ro.engine, gpus_per_node=lc.gpus_per_node)
        except LayoutError as e:
            problems.append(str(e))
    if problems:
        raise RecipeError("; ".join(problems))
    opt = cfg.optim
    per_step = opt.micro_batch_size * dp
    return DeviceLayout(world=world, actor_world=world, tp=tp, pp=pp, dp=dp,
                        vpp=par.virtual_pipeline_model_parallel_size, rollout_tp=ro.tensor_parallel_size,
                        rollout_gpus=world, engines=rollout.engines,
                        microbatches=max(1, opt.train_batch_size // per_step) if per_step else 1,
                        colocated=True, rollout=rollout)


def _model_problems(arch: ModelArchitecture, lay: DeviceLayout) -> list:
    from spark_megatron.models.families import family_for_config
    from spark_megatron.models.qwen2 import ModelSpecError

    problems = []
    try:
        fam = family_for_config(arch.hf_config, arch.source)
        fam.check_layout(fam.shape_from_hf_dict(arch.hf_config, arch.source), lay.tp, lay.pp)
    except ModelSpecError as e:
        problems.append(f"{arch.source}: {e}")
    text = arch.text
    if lay.vpp:
        if lay.pp < 2 or text.num_layers % (lay.pp * lay.vpp):
            problems.append(f"virtual pipeline {lay.vpp} x PP {lay.pp} must divide num_hidden_layers "
                            f"{text.num_layers} with PP >= 2")
    rtp = lay.rollout_tp
    if text.num_heads % rtp:
        problems.append(f"rollout TP {rtp} does not divide num_attention_heads {text.num_heads}")
    if text.num_kv_heads % rtp and rtp % text.num_kv_heads:
        problems.append(f"rollout TP {rtp} neither divides nor is a multiple of num_key_value_heads "
                        f"{text.num_kv_heads}")
    return problems


def _batch_problems(cfg, lay: DeviceLayout) -> list:
    opt, problems = cfg.optim, []
    if opt.micro_batch_size < 1 or opt.train_batch_size < 1:
        return ["optim.micro_batch_size and optim.train_batch_size must be >= 1"]
    if opt.train_batch_size % (opt.micro_batch_size * lay.dp):
        problems.append(f"optim.train_batch_size {opt.train_batch_size} is not a multiple of micro_batch_size "
                        f"{opt.micro_batch_size} x DP {lay.dp}")
    rollouts = cfg.data.prompts_per_step * cfg.rollout.n
    if rollouts % opt.train_batch_size:
        problems.append(f"data.prompts_per_step {cfg.data.prompts_per_step} x rollout.n {cfg.rollout.n} = "
                        f"{rollouts} sequences do not split into optim.train_batch_size {opt.train_batch_size}")
    return problems


def _precision_problems(cfg) -> list:
    m, lc, problems = cfg.model, cfg.launch, []
    if lc.gpu_arch not in GPU_ARCHS:
        problems.append(f"launch.gpu_arch '{lc.gpu_arch}' is not one of {', '.join(GPU_ARCHS)}")
    if m.params_dtype not in PARAM_DTYPES:
        problems.append(f"model.params_dtype '{m.params_dtype}' is not one of {', '.join(PARAM_DTYPES)}")
    if m.fp8 is not None:
        if m.fp8 not in FP8_RECIPES:
            problems.append(f"model.fp8 '{m.fp8}' is not one of {', '.join(FP8_RECIPES)}")
        if lc.gpu_arch not in FP8_ARCHS:
            problems.append(f"model.fp8='{m.fp8}' needs a Hopper GPU (launch.gpu_arch=hopper), the target is "
                            f"'{lc.gpu_arch}'")
        if not lc.container_has_te:
            problems.append(f"model.fp8='{m.fp8}' needs Transformer Engine, but launch.container_has_te is false")
        if m.params_dtype != "bfloat16":
            problems.append(f"model.fp8 trains with bf16 master weights; model.params_dtype is '{m.params_dtype}'")
    if cfg.parallel.sequence_parallel and (not lc.container_has_te or lc.gpu_arch == "cpu"):
        problems.append("parallel.sequence_parallel needs Transformer Engine on a GPU target")
    return problems


def _executor_problems(cfg) -> list:
    lc, problems = cfg.launch, []
    if lc.executor not in EXECUTORS:
        problems.append(f"launch.executor '{lc.executor}' is not one of {', '.join(EXECUTORS)}")
    if lc.executor == "local" and lc.nodes != 1:
        problems.append(f"launch.executor=local runs on one node, launch.nodes is {lc.nodes}")
    if lc.executor == "slurm":
        if not lc.account:
            problems.append("launch.executor=slurm needs launch.account")
        if lc.tunnel not in TUNNELS:
            problems.append(f"launch.tunnel '{lc.tunnel}' is not one of {', '.join(TUNNELS)}")
        if lc.tunnel == "ssh" and not (lc.ssh_host and lc.ssh_user and lc.remote_job_dir):
            problems.append("launch.tunnel=ssh needs launch.ssh_host, launch.ssh_user and launch.remote_job_dir")
        for m in lc.container_mounts:
            if not isinstance(m, str) or ":" not in m:
                problems.append(f"launch.container_mounts entry {m!r} is not 'src:dst'")
    return problems


def validate_recipe(cfg, arch: Optional[ModelArchitecture], launching: bool = False) -> DeviceLayout:
    """Every check at once (with `launching`, also what the executor needs: account, tunnel, mounts);
    raises RecipeError listing all problems, else returns the device layout. Without `arch` the checks that
    need the model's shape are left out (the trainer's preflight runs them once the model is at hand)."""
    problems = _precision_problems(cfg) + (_executor_problems(cfg) if launching else [])
    try:
        lay = device_layout(cfg)
    except RecipeError as e:
        raise RecipeError("; ".join(problems + [str(e)])) from None
    problems += _model_problems(arch, lay) if arch is not None else []
    problems += _batch_problems(cfg, lay)
    if problems:
        raise RecipeError("; ".join(problems))
    return lay
