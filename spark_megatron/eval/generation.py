"""Generation for evaluation: prompts in, one greedy response each out, behind a small interface.

`Generator` is any callable `list[Prompt] -> list[Generation]`. `EngineGenerator` drives one rollout engine
(vLLM, or the HF engine for VL models on CPU). Splitting a batch across several data-parallel engines is another
Generator with the same signature: the evaluation loop does not change when it arrives.
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
    """One engine. Prompts the engine cannot render (longer than max_prompt_tokens) come back as errors instead
    of failing their whole batch."""

    def __init__(self, engine, decoding):
        self.engine = engine
        self.spec = sampling_spec(decoding)

    def __call__(self, prompts: Sequence[Prompt]) -> list:
        out: list = [None] * len(prompts)
        ok = []
        renderer = getattr(self.engine, "renderer", None)
        for i, p in enumerate(prompts):
            try:
                ok.append(renderer.render(p) if renderer is not None else p)
            except ValueError as e:
                out[i] = Generation("", 0, "error", str(e))
        groups = iter(self.engine.generate(ok, self.spec) if ok else [])
        for i in range(len(prompts)):
            if out[i] is None:
                r = next(groups).rollouts[0]
                out[i] = Generation(r.response_text, len(r.response_token_ids), r.finish_reason)
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


def build_eval_engine(engine_cfg, decoding, hf_dir):
    """A rollout engine serving `hf_dir` with the suite's engine settings."""
    import torch

    from spark_megatron.config import RolloutConfig
    from spark_megatron.rollout.engine import build_engine

    name, dtype = engine_choice(engine_cfg, hf_dir)
    cuda = torch.cuda.is_available()
    rc = RolloutConfig(engine=name, n=1, temperature=decoding.temperature, top_p=decoding.top_p,
                       max_prompt_tokens=engine_cfg.max_prompt_tokens, max_response_tokens=decoding.max_tokens,
                       tensor_parallel_size=engine_cfg.tensor_parallel_size,
                       gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
                       kv_cache_memory_bytes=engine_cfg.kv_cache_memory_bytes, enforce_eager=not cuda)
    # an evaluation owns its engine (no trainer to share GPUs with): vLLM's standalone placement
    extra = {"placement": "standalone"} if name == "vllm" else {}
    return build_engine(rc, hf_dir, dtype=dtype, seed=0, **extra)
