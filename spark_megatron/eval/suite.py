"""An evaluation suite: which datasets, how to decode, how to judge. Loaded from YAML, `key=value` overrides.

    name: spark-vl-math
    decoding: {max_tokens: 2048, repetition_penalty: 1.05}   # greedy; the SPARK reference's settings
    datasets:
      - {name: MathVista, path: /data/mathvista/testmini.parquet, format: mathvista, kind: answer}
      - {name: VL-RewardBench, path: /data/vlrb/test.parquet, format: vl_rewardbench, kind: judgment}

Overrides use the same dotted keys (`decoding.max_tokens=64`); a dataset's fields are `datasets.<name>.<field>`
(`datasets.MathVista.limit=50`). A suite that cannot be honoured is rejected at load with a one-line reason.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from spark_megatron.config import ConfigError, apply_override, build_dataclass, parse_overrides

REFERENCE_SYSTEM_PROMPT = "You are a helpful assistant."
REFERENCE_INSTRUCTION = ("Please first conduct reasoning, and then answer the question. Repeat the final answer "
                         "using a '\\boxed{}'.")
"""What the SPARK reference evaluation (InternLM/Spark, Evaluation/evaluation.py) sends: a system turn and this
sentence appended to every question (the models were trained with it)."""

KINDS = ("answer", "judgment")
EXECUTION_KEYS = ("batch_size", "tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization",
                  "kv_cache_memory_bytes", "timeout_s")
"""Engine settings that do not change the results (kept out of the suite fingerprint): a preempted job may
resume on other resources, e.g. with more engines."""
JUDGE_MODES = ("pairwise", "pointwise")


@dataclass
class DecodingConfig:
    temperature: float = 0.0
    """0 = greedy, as the reference evaluates."""
    top_p: float = 1.0
    max_tokens: int = 2048
    """Most generated tokens per response (the reference's max_tokens)."""
    repetition_penalty: float = 1.05
    """The reference's repetition penalty (vLLM / HF semantics)."""


@dataclass
class EngineConfig:
    engine: str = "auto"
    """auto | vllm | hf. auto: vLLM, except the HF engine for a VL model without CUDA (vLLM's Qwen2.5-VL needs a
    CUDA torchvision)."""
    dtype: str = "auto"
    """auto (float32 on CPU, the checkpoint's dtype on GPU) | float32 | bfloat16 | float16."""
    tensor_parallel_size: int = 1
    """GPUs (ranks) per vLLM engine: consecutive ranks of the job, as the training's rollout.tensor_parallel_size
    (one layout function, spark_megatron/rollout/layout.py). The HF engine needs 1."""
    data_parallel_size: int = 1
    """Engines; each batch of prompts is split across them (balanced, in order). The job has data_parallel_size
    x tensor_parallel_size ranks: spawned here on CPU, or the torchrun world (which must equal it)."""
    timeout_s: float = 3600.0
    """Deadline of one engine call in a job of several ranks (a hung engine ends the job with one line naming
    it, like the training's rollout.engine_timeout_s)."""
    max_prompt_tokens: int = 8192
    """Longest prompt (judge prompts that show several responses are the longest); longer ones fail the item."""
    kv_cache_memory_bytes: Optional[int] = None
    """vLLM KV-cache size; None = 64 MiB on CPU, gpu_memory_utilization on GPU."""
    gpu_memory_utilization: float = 0.85
    batch_size: int = 64
    """Items per generation call; items.jsonl is appended after each batch (a kill loses at most one batch)."""


@dataclass
class SelfReflectionConfig:
    enabled: bool = False
    """Answer -> the model judges its own answer -> retry when it does not say Yes (answer datasets only)."""
    max_rounds: int = 2
    """Most retries (the reference: 2)."""


@dataclass
class DatasetSpec:
    name: str = ""
    """Column name in summary.json and table.md; unique within the suite."""
    path: str = ""
    """Local file (.jsonl, .json, .parquet, .arrow, .csv) or a saved HF dataset directory; relative paths
    resolve against the suite file's directory. Nothing is downloaded."""
    format: str = "spark"
    """Record schema: see spark_megatron.eval.formats.FORMATS (spark, spark_bench, mathvista, ...)."""
    kind: str = "answer"
    """answer (accuracy of the boxed final answer) | judgment (the model as a judge; reward benchmarks)."""
    split: Optional[str] = None
    """Split of a saved HF dataset directory (default: its only split, or 'test')."""
    subset: Optional[str] = None
    """Keep only items of this subset (e.g. 'Math' of RewardBench2, 'MathVista' of a spark_bench file)."""
    limit: int = 0
    """Evaluate the first N usable items (0 = all)."""
    image_root: Optional[str] = None
    """Directory that relative image paths of the records resolve against (default: the data file's)."""
    instruction: Optional[str] = None
    """Sentence appended to each question; None = the suite's; '' = none (records that carry their own)."""
    judge_mode: str = "pairwise"
    """Preference formats: pairwise (the training's pairwise template per chosen/rejected pair) | pointwise (the
    training's Yes/No template per response)."""


@dataclass
class Suite:
    name: str = "suite"
    system_prompt: str = REFERENCE_SYSTEM_PROMPT
    """System turn of every prompt ('' = none)."""
    instruction: str = REFERENCE_INSTRUCTION
    """Appended to questions of benchmark formats (the spark/spark_bench records carry their own or get it)."""
    judge_template: int = 0
    """Index of the training template used for judgments (fixed: evaluation is deterministic)."""
    seed: int = 0
    """Seeds the A/B order of pairwise judgments (per item, reproducible)."""
    on_bad_record: str = "skip"
    """skip: name and count bad records, evaluate the rest | fail: stop at the first."""
    verify_timeout_s: float = 5.0
    """Per-answer CPU-time limit of the math-equivalence check (the training verifier's; past it: wrong)."""
    verify_workers: int = 2
    """Verifier worker processes (killed at the timeout); 0 = in-process."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    self_reflection: SelfReflectionConfig = field(default_factory=SelfReflectionConfig)
    datasets: list = field(default_factory=list)
    """DatasetSpec entries, in table order."""

    def dataset(self, name: str) -> DatasetSpec:
        for d in self.datasets:
            if d.name == name:
                return d
        raise ConfigError(f"no dataset named '{name}' in the suite (have: {', '.join(d.name for d in self.datasets)})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, data_hashes: Optional[dict] = None) -> str:
        """Hash of everything that decides the results (settings, dataset specs and, if given, file hashes).
        How the work is executed (batch size, GPUs per engine, memory, verifier workers) is left out: a
        preempted job may resume with other resources."""
        suite = self.to_dict()
        for key in EXECUTION_KEYS:
            suite["engine"].pop(key, None)
        suite.pop("verify_workers", None)
        blob = json.dumps({"suite": suite, "data": data_hashes or {}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _datasets(raw, where: str, base_dir: Path) -> list:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: 'datasets' must be a non-empty list")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: datasets[{i}] must be a mapping")
        spec = build_dataclass(DatasetSpec, entry, f"datasets[{i}]")
        if spec.path and not Path(spec.path).is_absolute() and not spec.path.startswith("synthetic:"):
            spec.path = str(base_dir / spec.path)
        out.append(spec)
    return out


def _override_dataset(suite: Suite, key: str, value) -> None:
    rest = key[len("datasets."):]
    name, _, attr = rest.rpartition(".")
    if not name:
        raise ConfigError(f"override '{key}': use datasets.<name>.<field>")
    apply_override(suite.dataset(name), attr, value)


def validate(suite: Suite) -> Suite:
    """One-line ConfigError for anything the evaluation cannot honour."""
    from spark_megatron.eval.formats import FORMATS

    names = [d.name for d in suite.datasets]
    if not suite.datasets:
        raise ConfigError("the suite names no datasets")
    for d in suite.datasets:
        where = f"dataset '{d.name}'"
        if not d.name or names.count(d.name) > 1:
            raise ConfigError(f"{where}: every dataset needs a unique name")
        if not d.path:
            raise ConfigError(f"{where}: no path")
        if d.format not in FORMATS:
            raise ConfigError(f"{where}: unknown format '{d.format}' (known: {', '.join(sorted(FORMATS))})")
        if d.kind not in KINDS:
            raise ConfigError(f"{where}: kind must be answer or judgment, got '{d.kind}'")
        if d.kind not in FORMATS[d.format].kinds:
            raise ConfigError(f"{where}: format '{d.format}' holds {' or '.join(FORMATS[d.format].kinds)} tasks, "
                              f"not kind '{d.kind}'")
        if d.judge_mode not in JUDGE_MODES:
            raise ConfigError(f"{where}: judge_mode must be pairwise or pointwise, got '{d.judge_mode}'")
        if d.limit < 0:
            raise ConfigError(f"{where}: limit must be >= 0")
    if suite.engine.engine not in ("auto", "vllm", "hf"):
        raise ConfigError(f"engine.engine must be auto, vllm or hf, got '{suite.engine.engine}'")
    if suite.engine.batch_size < 1 or suite.decoding.max_tokens < 1:
        raise ConfigError("engine.batch_size and decoding.max_tokens must be >= 1")
    if suite.engine.tensor_parallel_size < 1 or suite.engine.data_parallel_size < 1:
        raise ConfigError("engine.tensor_parallel_size and engine.data_parallel_size must be >= 1")
    if suite.engine.engine == "hf" and suite.engine.tensor_parallel_size != 1:
        raise ConfigError("engine.engine=hf runs one full model per rank: engine.tensor_parallel_size must be 1")
    if suite.engine.timeout_s <= 0:
        raise ConfigError("engine.timeout_s must be > 0")
    if suite.self_reflection.max_rounds < 0:
        raise ConfigError("self_reflection.max_rounds must be >= 0")
    if suite.on_bad_record not in ("skip", "fail"):
        raise ConfigError(f"on_bad_record must be skip or fail, got '{suite.on_bad_record}'")
    from spark_megatron.recycle import templates

    count = min(templates.template_count(t, m) for t in ("pointwise_yes_no", "pairwise") for m in templates.MODALITIES)
    if not 0 <= suite.judge_template < count:
        raise ConfigError(f"judge_template must be in 0..{count - 1}, got {suite.judge_template}")
    return suite


def load_suite(path: str, overrides: Optional[list] = None) -> Suite:
    """Suite YAML + `key=value` overrides -> validated Suite; ConfigError naming the file on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"suite file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = dict(data)
    raw_datasets = data.pop("datasets", None)
    try:
        suite = build_dataclass(Suite, data)
        suite.datasets = _datasets(raw_datasets, path, p.parent.absolute())
        for key, value in parse_overrides(overrides or []):
            if key.startswith("datasets."):
                _override_dataset(suite, key, value)
            else:
                apply_override(suite, key, value)
        return validate(suite)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
