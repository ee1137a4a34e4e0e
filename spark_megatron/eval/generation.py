"""Generation for evaluation: prompts in, one greedy response each out, behind a small interface.

`Generator` is any callable `list[Prompt] -> list[Generation]` (with an optional `close()`, called when the
evaluation ends). `EngineGenerator` drives one rollout engine in this process (vLLM, or the HF engine for VL
models on CPU); `eval/ranks.py::FleetGenerator` splits each batch across the data-parallel engines of a job of
several ranks (`build_eval_fleet`, the training's colocated layout). The evaluation loop is the same for both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from spark_megatron.config import ConfigError
from spark_megatron.types import ImageRef, Prompt


@dataclass
class Generation:
    text: str
    tokens: int
    """Generated tokens."""
    finish_reason: str = "stop"
    """stop | length | error (the prompt could not be served, e.g. too long; counted wrong)."""
    error: str = ""


class Generator(Protocol):
    def __call__(self, prompts: Sequence[Prompt]) -> list: ...


def sampling_spec(decoding):
    """DecodingConfig -> the rollout engines' SamplingSpec (one response per prompt)."""
    from spark_megatron.rollout.engine import SamplingSpec

    return SamplingSpec(n=1, temperature=decoding.temperature, top_p=decoding.top_p, max_tokens=decoding.max_tokens,
                        seed=None, repetition_penalty=decoding.repetition_penalty)


class EngineGenerator:
    """One engine in this process."""

    def __init__(self, engine, decoding):
        self.engine = engine
        self.spec = sampling_spec(decoding)

    def __call__(self, prompts: Sequence[Prompt]) -> list:
        ok, errors = renderable(self.engine, prompts)
        return merge(errors, self.engine.generate(ok, self.spec) if ok else [])

    def close(self) -> None:
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()


def renderable(engine, prompts: Sequence[Prompt]) -> tuple:
    """(prompts the engine can serve, rendered; per prompt an error Generation or None). Prompts the engine
    cannot render (longer than max_prompt_tokens) come back as errors instead of failing their whole batch."""
    errors: list = [None] * len(prompts)
    ok = []
    renderer = getattr(engine, "renderer", None)
    for i, p in enumerate(prompts):
        try:
            ok.append(renderer.render(p) if renderer is not None else p)
        except ValueError as e:
            errors[i] = Generation("", 0, "error", str(e))
    return ok, errors


def merge(errors: list, groups) -> list:
    """Per prompt its error, else the next RolloutGroup's response (groups: of the served prompts, in order)."""
    groups = iter(groups)
    out = []
    for err in errors:
        if err is None:
            r = next(groups).rollouts[0]
            err = Generation(r.response_text, len(r.response_token_ids), r.finish_reason)
        out.append(err)
    return out


def messages_prompt(messages: list, uid: str) -> Prompt:
    """A Prompt for chat messages built from another prompt (judge / retry turns): its image parts carry the
    image paths, so the images travel with the new task."""
    images = []
    for m in messages:
        content = m.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image":
                images.append(ImageRef(part["image"], part.get("max_pixels"), part.get("min_pixels")))
    return Prompt(uid=uid, messages=messages, ground_truth="", images=images)


def text_generate(generator: Generator, log: dict) -> Callable:
    """`messages lists -> texts` (what recycle.self_reflect drives) over a Generator; every Generation is kept
    in `log` under its messages' key (greedy: equal messages give equal generations)."""

    def generate(batch: list) -> list:
        gens = generator([messages_prompt(m, f"m{i}") for i, m in enumerate(batch)])
        for m, g in zip(batch, gens):
            log[messages_key(m)] = g
        return [g.text for g in gens]

    return generate


def messages_key(messages: list) -> str:
    return json.dumps(messages, sort_keys=True)


# ---------------------------------------------------------------------------------------------- engines

def is_vl_checkpoint(hf_dir) -> bool:
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    return cfg.get("model_type") == "qwen2_5_vl" or "vision_config" in cfg


def engine_choice(engine_cfg, hf_dir) -> tuple:
    """(engine name, dtype) for this checkpoint on this machine; ConfigError when it cannot be served."""
    import torch

    cuda = torch.cuda.is_available()
    vl = is_vl_checkpoint(hf_dir)
    name = engine_cfg.engine
    if name == "auto":
        name = "hf" if vl and not cuda else "vllm"
    if name == "vllm" and vl and not cuda:
        raise ConfigError("engine.engine=vllm cannot serve Qwen2.5-VL on a CPU machine (vLLM's Qwen2.5-VL needs a "
                          "CUDA torchvision); use engine.engine=hf (or auto)")
    dtype = engine_cfg.dtype
    if dtype == "auto":
        dtype = "float32" if not cuda else ("auto" if name == "vllm" else "bfloat16")
    return name, dtype


def _rollout_config(engine_cfg, decoding, name: str):
    import torch

    from spark_megatron.config import RolloutConfig

    return RolloutConfig(engine=name, n=1, temperature=decoding.temperature, top_p=decoding.top_p,
                         max_prompt_tokens=engine_cfg.max_prompt_tokens, max_response_tokens=decoding.max_tokens,
                         tensor_parallel_size=engine_cfg.tensor_parallel_size,
                         gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
                         kv_cache_memory_bytes=engine_cfg.kv_cache_memory_bytes,
                         enforce_eager=not torch.cuda.is_available())


def build_eval_engine(engine_cfg, decoding, hf_dir):
    """A rollout engine serving `hf_dir` with the suite's engine settings, in this process (a job of one rank)."""
    from spark_megatron.rollout.engine import build_engine

    name, dtype = engine_choice(engine_cfg, hf_dir)
    # an evaluation owns its engine (no trainer to share GPUs with): vLLM's standalone placement
    extra = {"placement": "standalone"} if name == "vllm" else {}
    return build_engine(_rollout_config(engine_cfg, decoding, name), hf_dir, dtype=dtype, seed=0, **extra)


def eval_layout(engine_cfg, world: int, engine: str):
    """The engines of an evaluation job of `world` ranks: the training's colocated layout (rollout/layout.py)
    with engine.tensor_parallel_size consecutive ranks per engine. ConfigError (one line) if it cannot be built."""
    import torch

    from spark_megatron.rollout.layout import rollout_layout

    tp = engine_cfg.tensor_parallel_size
    if world % tp:
        raise ConfigError(f"engine.tensor_parallel_size {tp} does not divide the {world} ranks of the job")
    if engine == "hf" and tp != 1:
        raise ConfigError(f"the HF engine (engine.engine={engine_cfg.engine}) runs one full model per rank: "
                          "engine.tensor_parallel_size must be 1")
    return rollout_layout(world, 1, 1, tp, on_gpu=torch.cuda.is_available(), engine=engine)


def build_eval_fleet(engine_cfg, decoding, hf_dir, rank: int, world: int):
    """This rank's part of the evaluation's engines (every rank of the job calls this together: vLLM builds its
    groups collectively) -> an EngineFleet, whose generate splits the prompts across the engines. Engine e
    samples with seed e (greedy evaluation does not sample)."""
    from spark_megatron.rollout.fleet import EngineFleet

    name, dtype = engine_choice(engine_cfg, hf_dir)
    layout = eval_layout(engine_cfg, world, name)
    rc = _rollout_config(engine_cfg, decoding, name)
    seed = layout.engine_of(rank)
    if name == "vllm":
        from spark_megatron.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(hf_dir, rc, dtype=dtype, seed=seed, placement="colocated")
    else:
        from spark_megatron.rollout.hf_engine import HFEngine

        engine = HFEngine(hf_dir, rc, dtype=dtype, seed=seed)
    return EngineFleet(layout, engine, rank, engine_cfg.timeout_s, timeout_setting="engine.timeout_s")
