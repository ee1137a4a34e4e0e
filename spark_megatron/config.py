"""Typed configuration tree for a SPARK run.

Each component receives only its own dataclass (ModelConfig to the model provider, RolloutConfig to the rollout
engine, ...). A recipe is YAML mirroring this tree; `key.sub=value` overrides on the command line are applied on
top. Unknown keys are rejected with a suggestion, values are coerced to the field's declared type.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config tree."""


@dataclass
class ModelConfig:
    hf_path: str = ""
    """HF checkpoint directory (config.json + safetensors + tokenizer). `tiny:<name>` builds a tiny random model."""
    megatron_path: Optional[str] = None
    """Optional pre-converted Megatron dist-checkpoint to load instead of converting `hf_path` on the fly."""
    params_dtype: str = "float32"
    """Parameter/compute dtype of the actor: float32 | bfloat16 | float16."""
    fp8: Optional[str] = None
    """Transformer Engine FP8 recipe on Hopper: None | delayed | tensorwise | blockwise (GPU + TE only)."""
    freeze_vision: bool = False
    """VL models: keep the vision encoder frozen (no grads, no optimizer state)."""
    recompute_activations: bool = False
    """Full activation recomputation per layer (saves memory at ~30% extra compute)."""
    reference_offload: bool = False
    """Keep the frozen reference model's weights in host memory between its logprob passes (moved to the GPU for
    each pass): frees a model's worth of GPU memory for one host->device copy per step. No effect without CUDA."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size of the actor (must divide heads, KV groups and the padded vocab)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages of the actor (must divide the number of layers)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved pipeline chunks per stage (None = plain 1F1B)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (GPU with TE only)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (Megatron DistributedOptimizer)."""
    make_vocab_size_divisible_by: int = 128
    """Vocab padding unit (multiplied by TP when TP does not divide it), as in Megatron-LM. A Megatron checkpoint
    (model.megatron_path) must have been converted with the same (`--make-vocab-size-divisible-by`)."""
    data_parallel_size: int = 1
    """Data-parallel replicas of the actor: the job has TP x PP x DP ranks. `spark-megatron train` without torchrun
    spawns that many gloo ranks; under torchrun the world must equal TP x PP x DP (checked at start)."""


@dataclass
class RolloutConfig:
    engine: str = "vllm"
    """Rollout engine: vllm | hf (HF transformers generate, for cross-checks)."""
    n: int = 8
    """Rollouts per prompt (GRPO group size)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 8192
    max_response_tokens: int = 768
    tensor_parallel_size: int = 1
    """TP size of each vLLM engine (may differ from the actor's). Colocated: world / this = engines, each on
    consecutive ranks; each step's prompts are split across the engines."""
    colocate: bool = True
    """Every rank of the job hosts its part of an engine (vLLM external_launcher) and vLLM sleeps while the actor
    trains. False (dedicated rollout GPUs) is not built: rejected at load (see rollout/layout.py)."""
    sleep_level: int = 1
    """vLLM sleep level while the actor trains (colocated, GPU): 1 offloads the weights to host memory, 2 discards
    them (the push that follows every update rewrites them anyway). CPU: the calls are made and recorded only."""
    engine_timeout_s: float = 3600.0
    """Longest wait on a rollout engine (one generate / score / weight push / sleep / wake); past it the rank
    ends the run with one line naming the engine and the operation."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take in colocated mode."""
    kv_cache_memory_bytes: Optional[int] = None
    """Explicit KV-cache size (required on CPU, where the default takes most of RAM)."""
    sync_bucket_mb: int = 512
    """Weight-sync bucket size in MiB; one bucket of extra memory at a time."""
    enforce_eager: bool = False
    """Disable CUDA graphs / torch.compile in vLLM (faster startup, slower decode)."""


@dataclass
class RecycleConfig:
    enabled: bool = True
    """Build judgment/reflection tasks from policy rollouts (False = plain GRPO)."""
    schedule: str = "alternate"
    """alternate: a separate reward-period update when the queue holds a full batch; mixed: into the policy batch."""
    judge_input: str = "answer"
    """What the judge sees of a response: answer | cot | both (the CoT plus its final answer) | mixed (each
    sample shows the answer or the CoT with equal chance: the paper's best answer+CoT data mix)."""
    pointwise_prob_mixed: float = 0.3
    """Mixed groups: probability of a pointwise (vs pairwise) judgment sample."""
    max_judgment_per_step: int = 32
    """Most pointwise + pairwise samples kept per step (seeded random subset); negative = no cap."""
    max_reflection_per_step: int = 32
    """Most reflection samples kept per step; negative = no cap."""
    reflection_full_cot_prob: float = 0.5
    """Reflection samples that show the full chain of thought (the rest show only the final answer)."""
    label_style: str = "yes_no"
    """Pointwise label phrasing: yes_no | ab (A = correct, B = incorrect) | both (each sample 50/50)."""
    reward_batch_size: int = 0
    """Recycled prompts per reward-period update (alternate schedule); 0 = data.prompts_per_step."""
    max_reward_batches_per_step: int = 1
    """Most reward-period updates run after one policy step (bounds the time spent draining a backlog)."""
    mixed_max_per_step: int = 0
    """Mixed schedule: most recycled prompts appended to one policy batch; 0 = the reward batch size."""
    queue_max_size: int = 0
    """Most samples the FIFO queue holds (oldest dropped and counted beyond it); 0 = unbounded."""


@dataclass
class AlgorithmConfig:
    adv_eps: float = 1e-9
    """Epsilon in (r - mean) / (std + eps)."""
    adv_std_unbiased: bool = True
    """Unbiased (n-1) std in the group normalisation, as the reference code does."""
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 1e-3
    kl_estimator: str = "k3"
    """k1 | k2 | k3 estimator of KL(policy || reference)."""
    loss_agg: str = "token-mean"
    """token-mean (global token count) | seq-mean-token-mean | seq-mean-token-sum."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling cap for train/rollout logprob mismatch (None = off)."""
    format_reward_weight: float = 0.0
    """w in reward = (1 - w) * accuracy + w * format (a boxed answer is present); 0 = the reference's 0/1."""
    perception_reward_weight: float = 0.0
    """Vision-SR1 perception reward weight (1.0 in Vision-SR1); 0 = off."""
    adv_estimator: str = "grpo"
    """Advantage estimator by name: grpo | grpo_mean_only (no std division)."""
    verify_timeout_s: float = 5.0
    """Per-answer limit, in CPU seconds, on the math-equivalence check; an answer past it counts wrong
    (timed_out)."""
    verify_workers: int = 2
    """Verifier worker processes (killed at the timeout); 0 = in-process (signal timer, main thread only)."""
    recycle: RecycleConfig = field(default_factory=RecycleConfig)


@dataclass
class DataConfig:
    train_files: list = field(default_factory=list)
    """Spark-Data JSON/JSONL files or `hf:<dataset dir>`; `synthetic:arith` is the built-in toy task."""
    prompts_per_step: int = 64
    epochs: int = 1
    shuffle: bool = True
    on_bad_record: str = "fail"
    """fail: stop at the first bad record; skip: skip and report the count per file."""
    image_max_pixels: int = 12845056
    image_min_pixels: int = 3136


@dataclass
class OptimConfig:
    lr: float = 5e-7
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    micro_batch_size: int = 1
    """Sequences per micro-batch in the actor's forward/backward."""
    train_batch_size: int = 64
    """Sequences per optimizer step (the rollouts of a step are split into such mini-batches)."""
    shuffle_minibatches: bool = True
    """Shuffle the step's sequences (seeded by the run seed and the optimizer step) before cutting them into
    mini-batches, as the reference's data loader does; False keeps group order (a mini-batch then holds whole
    prompt groups)."""
    stop_after_bad_updates: int = 10
    """Stop the run after this many consecutive optimizer updates whose loss or gradient is non-finite (each is
    skipped) or whose gradient is exactly zero; 0 = never stop."""


@dataclass
class CheckpointConfig:
    save_interval: int = 50
    """Steps between checkpoints (0 = only at the end)."""
    keep_last: int = 2
    """Complete checkpoints of this run kept on disk (older ones are deleted); 0 = keep all."""
    resume: bool = False


@dataclass
class LoggingConfig:
    wandb_project: Optional[str] = None
    """None disables wandb; otherwise logs to this project."""
    wandb_mode: str = "offline"
    """online | offline (written under output_dir/wandb, `wandb sync` later) | disabled."""
    tensorboard: bool = True
    """TensorBoard event files under output_dir/tensorboard."""
    progress: bool = True
    """Progress bars (warm-up, SPARK steps) on rank 0's console."""
    summary_interval: int = 10
    """Rank 0's console gets a one-line summary of the step every this many steps (and after the last step);
    0 = none. Every step's full metrics are in metrics.jsonl; every rank's log is output_dir/logs/rank<N>.log."""


@dataclass
class LaunchConfig:
    executor: str = "local"
    """local (torchrun on this node) | slurm."""
    nodes: int = 1
    """Nodes of the job (local: must be 1)."""
    gpus_per_node: int = 1
    """GPUs per node = torchrun processes per node (on CPU: gloo ranks per node)."""
    account: Optional[str] = None
    """Slurm account (`#SBATCH --account`); required for slurm."""
    partition: Optional[str] = None
    """Slurm partition (`#SBATCH --partition`)."""
    time_limit: str = "04:00:00"
    """Slurm wall-clock limit (`#SBATCH --time`); longer runs resume from checkpoints (checkpoint.resume)."""
    container_image: Optional[str] = None
    """Pyxis/enroot image for srun (registry#image:tag or a .sqsh path); None runs on the bare node."""
    container_mounts: list = field(default_factory=list)
    """Pyxis mounts 'src:dst' (model, data and output directories must be visible inside the container)."""
    env: dict = field(default_factory=dict)
    """Extra environment variables exported for every rank."""
    gpu_arch: str = "hopper"
    """Target GPU architecture: hopper | blackwell | ada | ampere | cpu. FP8 recipes require hopper."""
    gpu_memory_gib: float = 80.0
    """Memory of one device in GiB, the planner's budget (H100 80, H200 141)."""
    container_has_te: bool = True
    """The target environment provides Transformer Engine (needed for fp8 and sequence parallelism)."""
    model_config: Optional[str] = None
    """HF config.json the planner reads when model.hf_path is not readable on the launching machine
    (configs/models/*.json mirror the public configs)."""
    rollout_gpus: int = 0
    """GPUs reserved for dedicated vLLM engines. Not built (engines run colocated on every GPU): anything but 0
    is rejected by plan, launch and train."""
    job_name: str = "spark-train"
    """Experiment title / Slurm job-name suffix."""
    qos: Optional[str] = None
    """Slurm QoS (`#SBATCH --qos`), if the cluster uses one."""
    exclusive: bool = True
    """Request whole nodes (`#SBATCH --exclusive`)."""
    tunnel: str = "local"
    """How NeMo-Run reaches Slurm: local (running on a login node) | ssh (from a workstation)."""
    ssh_host: Optional[str] = None
    """Login node for tunnel=ssh."""
    ssh_user: Optional[str] = None
    """User on the login node for tunnel=ssh."""
    ssh_identity: Optional[str] = None
    """Private key for tunnel=ssh (None: ssh-agent / default keys)."""
    remote_job_dir: Optional[str] = None
    """Directory on the cluster's shared filesystem for NeMo-Run job files (required for tunnel=ssh)."""
    nemo_run_dir: Optional[str] = None
    """Where NeMo-Run keeps experiment metadata locally (default <output_dir>/nemo_run)."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 1234
    total_steps: int = 0
    """0 = run `data.epochs` full epochs."""
    warmup_sft_steps: int = 0
    """Supervised warm-up steps on ground-truth answers before RL (quickstart only)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# ---------------------------------------------------------------------------------------------- loading

def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, choices, where: str, part: str = None) -> ConfigError:
    """`part` is the dotted component that is unknown (default: the last one)."""
    close = difflib.get_close_matches(part or key.split(".")[-1], list(choices), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def _coerce(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}")
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}") from None
        if tp is int and num != int(num):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return tp(num)
    if tp is str:
        return str(value)
    if origin in (list, dict) or tp in (list, dict):
        want = origin or tp
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"config key '{key}' expects a {want.__name__}, got unparseable {value!r}") from None
        if not isinstance(value, want):
            raise ConfigError(f"config key '{key}' expects a {want.__name__}, got {value!r}")
        return value
    return value


def build_dataclass(cls, data: dict, prefix: str = ""):
    """A config dataclass from a plain dict (nested sections too), every value coerced to its field's type;
    an unknown key is a ConfigError naming `prefix.key` with the closest known key."""
    types = _field_types(cls)
    kwargs = {}
    for k, v in (data or {}).items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in types:
            raise _unknown(key, types, f"section '{prefix or 'root'}'")
        kwargs[k] = _coerce(v, types[k], key)
    return cls(**kwargs)


def apply_override(cfg, dotted: str, value: Any) -> None:
    """Set `a.b.c=value` on a config tree in place, coercing to the declared type."""
    parts = dotted.split(".")
    node = cfg
    for i, p in enumerate(parts):
        types = _field_types(type(node))
        if p not in types:
            raise _unknown(dotted, types, f"section '{'.'.join(parts[:i]) or 'root'}'", part=p)
        if i == len(parts) - 1:
            if isinstance(value, str) and typing.get_origin(types[p]) is None and dataclasses.is_dataclass(types[p]):
                raise ConfigError(f"config key '{dotted}' is a section, not a value")
            setattr(node, p, _coerce(value, types[p], dotted))
        else:
            node = getattr(node, p)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is a value, not a section")


def parse_overrides(items: list) -> list:
    """['a.b=1', ...] -> [('a.b', '1'), ...]; YAML scalars are parsed (1e-3, true, [a, b])."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        k, v = item.split("=", 1)
        try:
            value = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at column {where.column + 1}" if where is not None else ""
            raise ConfigError(f"override '{item}': value is not valid YAML{at} ({getattr(e, 'problem', e)}); "
                              f"quote strings with special characters, e.g. {k.strip()}=['a?b=1']") from None
        out.append((k.strip(), value))
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> RunConfig:
    """Load a YAML recipe (or defaults) and apply `key=value` overrides."""
    data = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    try:
        cfg = build_dataclass(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") if path else e
    for k, v in parse_overrides(overrides or []):
        apply_override(cfg, k, v)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------- value rules
# The range or choices of every field, checked before a run builds anything (launch/preflight.py). Choices that a
# registry also defines (KL estimators, loss aggregations, advantage estimators, recycle options) are spelled out
# here so this module stays import-free; tests/unit/test_config_rules.py checks that they match the registries.

@dataclass(frozen=True)
class Rule:
    """What values one config field accepts; `describe` completes "must be ..."."""

    describe: str
    test: typing.Callable[[Any], bool]
    optional: bool = False
    """None is accepted too."""

    def problem(self, value) -> Optional[str]:
        if value is None:
            return None if self.optional else "must be set"
        try:
            ok = bool(self.test(value))
        except (TypeError, ValueError):
            ok = False
        return None if ok else f"must be {self.describe}"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def at_least(lo, integer: bool = False) -> Rule:
    return Rule(f"{'an integer' if integer else 'a number'} >= {lo}", lambda v: _number(v) and v >= lo)


def in_range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> Rule:
    text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Rule(text, lambda v: _number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))


def positive() -> Rule:
    return Rule("a finite number > 0", lambda v: _number(v) and v > 0)


def one_of(*choices) -> Rule:
    return Rule("one of " + ", ".join(map(str, choices)), lambda v: v in choices)


def optional(rule: Rule) -> Rule:
    return dataclasses.replace(rule, describe=f"null or {rule.describe}", optional=True)


FLAG = Rule("true or false", lambda v: isinstance(v, bool))
INTEGER = Rule("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str))
NAME = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
NAMES = Rule("a list of non-empty strings", lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v))
STR_MAP = Rule("a mapping of names to values", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v))
SLURM_TIME = Rule("a Slurm time limit (minutes, [D-]HH:MM[:SS])",
                  lambda v: isinstance(v, str) and re.fullmatch(r"\d+(-\d+)?(:\d{1,2}){0,2}", v))

FIELD_RULES: dict = {
    "output_dir": NAME, "seed": at_least(0, integer=True), "total_steps": at_least(0, integer=True),
    "warmup_sft_steps": at_least(0, integer=True),
    "model.hf_path": TEXT, "model.megatron_path": optional(NAME),
    "model.params_dtype": one_of("float32", "bfloat16", "float16"),
    "model.fp8": optional(one_of("delayed", "tensorwise", "blockwise")),
    "model.freeze_vision": FLAG, "model.recompute_activations": FLAG, "model.reference_offload": FLAG,
    "parallel.tensor_model_parallel_size": at_least(1, integer=True),
    "parallel.pipeline_model_parallel_size": at_least(1, integer=True),
    "parallel.virtual_pipeline_model_parallel_size": optional(at_least(1, integer=True)),
    "parallel.data_parallel_size": at_least(1, integer=True), "parallel.sequence_parallel": FLAG, "parallel.use_distributed_optimizer": FLAG,
    "parallel.make_vocab_size_divisible_by": at_least(1, integer=True),
    "rollout.engine": one_of("vllm", "hf"), "rollout.n": at_least(1, integer=True),
    "rollout.temperature": at_least(0), "rollout.top_p": in_range(0, 1, lo_open=True),
    "rollout.max_prompt_tokens": at_least(1, integer=True), "rollout.max_response_tokens": at_least(1, integer=True),
    "rollout.tensor_parallel_size": at_least(1, integer=True), "rollout.colocate": FLAG,
    "rollout.sleep_level": one_of(1, 2), "rollout.engine_timeout_s": positive(),
    "rollout.gpu_memory_utilization": in_range(0, 1, lo_open=True),
    "rollout.kv_cache_memory_bytes": optional(at_least(1, integer=True)),
    "rollout.sync_bucket_mb": at_least(1, integer=True), "rollout.enforce_eager": FLAG,
    "algorithm.adv_eps": at_least(0), "algorithm.adv_std_unbiased": FLAG,
    "algorithm.clip_low": in_range(0, 1), "algorithm.clip_high": at_least(0), "algorithm.kl_coef": at_least(0),
    "algorithm.kl_estimator": one_of("k1", "k2", "k3", "low_var_kl"),
    "algorithm.loss_agg": one_of("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
    "algorithm.tis_cap": optional(positive()), "algorithm.format_reward_weight": in_range(0, 1),
    "algorithm.perception_reward_weight": at_least(0),
    "algorithm.adv_estimator": one_of("grpo", "grpo_mean_only"),
    "algorithm.verify_timeout_s": positive(), "algorithm.verify_workers": at_least(0, integer=True),
    "algorithm.recycle.enabled": FLAG, "algorithm.recycle.schedule": one_of("alternate", "mixed"),
    "algorithm.recycle.judge_input": one_of("answer", "cot", "both", "mixed"),
    "algorithm.recycle.pointwise_prob_mixed": in_range(0, 1),
    "algorithm.recycle.max_judgment_per_step": INTEGER, "algorithm.recycle.max_reflection_per_step": INTEGER,
    "algorithm.recycle.reflection_full_cot_prob": in_range(0, 1),
    "algorithm.recycle.label_style": one_of("yes_no", "ab", "both"),
    "algorithm.recycle.reward_batch_size": at_least(0, integer=True),
    "algorithm.recycle.max_reward_batches_per_step": at_least(0, integer=True),
    "algorithm.recycle.mixed_max_per_step": at_least(0, integer=True),
    "algorithm.recycle.queue_max_size": at_least(0, integer=True),
    "data.train_files": Rule("a non-empty list of data specs",
                             lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)),
    "data.prompts_per_step": at_least(1, integer=True), "data.epochs": at_least(1, integer=True),
    "data.shuffle": FLAG, "data.on_bad_record": one_of("fail", "skip"),
    "data.image_max_pixels": at_least(1, integer=True), "data.image_min_pixels": at_least(1, integer=True),
    "optim.lr": positive(), "optim.min_lr_ratio": in_range(0, 1), "optim.warmup_ratio": in_range(0, 1),
    "optim.adam_beta1": in_range(0, 1, hi_open=True), "optim.adam_beta2": in_range(0, 1, hi_open=True),
    "optim.weight_decay": at_least(0), "optim.clip_grad": at_least(0),
    "optim.micro_batch_size": at_least(1, integer=True), "optim.train_batch_size": at_least(1, integer=True),
    "optim.shuffle_minibatches": FLAG, "optim.stop_after_bad_updates": at_least(0, integer=True),
    "checkpoint.save_interval": at_least(0, integer=True), "checkpoint.keep_last": at_least(0, integer=True),
    "checkpoint.resume": FLAG,
    "logging.wandb_project": optional(NAME), "logging.wandb_mode": one_of("online", "offline", "disabled"),
    "logging.tensorboard": FLAG, "logging.progress": FLAG, "logging.summary_interval": at_least(0, integer=True),
    "launch.executor": one_of("local", "slurm"), "launch.nodes": at_least(1, integer=True),
    "launch.gpus_per_node": at_least(1, integer=True), "launch.account": optional(NAME),
    "launch.partition": optional(NAME), "launch.time_limit": SLURM_TIME, "launch.container_image": optional(NAME),
    "launch.container_mounts": NAMES, "launch.env": STR_MAP,
    "launch.gpu_arch": one_of("hopper", "blackwell", "ada", "ampere", "cpu"), "launch.gpu_memory_gib": positive(),
    "launch.container_has_te": FLAG, "launch.model_config": optional(NAME),
    "launch.rollout_gpus": at_least(0, integer=True), "launch.job_name": NAME, "launch.qos": optional(NAME),
    "launch.exclusive": FLAG, "launch.tunnel": one_of("local", "ssh"), "launch.ssh_host": optional(NAME),
    "launch.ssh_user": optional(NAME), "launch.ssh_identity": optional(NAME),
    "launch.remote_job_dir": optional(NAME), "launch.nemo_run_dir": optional(NAME),
}
"""dotted key -> Rule, for every leaf of the RunConfig tree (tests/unit/test_config_rules.py keeps it complete)."""


def leaf_keys(cls=RunConfig, prefix: str = "") -> list:
    """Dotted keys of every value (non-section) field of the config tree, in declaration order."""
    out = []
    for name, tp in _field_types(cls).items():
        key = f"{prefix}.{name}" if prefix else name
        out += leaf_keys(tp, key) if dataclasses.is_dataclass(tp) else [key]
    return out


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def value_problems(cfg: RunConfig) -> list:
    """'key=value (must be ...)' for every field outside its rule, plus the cross-field range constraints."""
    problems = []
    for key in leaf_keys(type(cfg)):
        rule = FIELD_RULES.get(key)
        value = _get(cfg, key)
        why = rule.problem(value) if rule is not None else None
        if why:
            problems.append(f"{key}={value!r} ({why})")
    d = cfg.data
    if _number(d.image_min_pixels) and _number(d.image_max_pixels) and d.image_min_pixels > d.image_max_pixels:
        problems.append(f"data.image_min_pixels={d.image_min_pixels} exceeds data.image_max_pixels="
                        f"{d.image_max_pixels}")
    return problems


def check_values(cfg: RunConfig) -> None:
    """Raise ConfigError naming every out-of-range or unknown-choice value, on one line."""
    problems = value_problems(cfg)
    if problems:
        raise ConfigError("invalid config value" + ("s" if len(problems) > 1 else "") + ": " + "; ".join(problems))
