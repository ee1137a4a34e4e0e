"""The rollout-engine contract: sampling spec, prompt rendering, the RolloutEngine protocol, weight versioning.

Engines (vLLM, HF reference) turn prompts into typed `Rollout`s, score fixed token sequences, and take weight
updates bucket by bucket through the loading interface `spark_megatron.sync.push.WeightLoader` declares (this
package does not import sync: the roles wrap an engine in a `sync.EngineSink`, which validates the whole update
first). A committed update stamps a policy version that every later rollout carries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from spark_megatron.types import Prompt


class EngineStateError(RuntimeError):
    """The engine cannot serve now (asleep, or its weights were left half-updated by a failed push)."""


@dataclass
class SamplingSpec:
    """How to sample the responses of one generate call."""

    n: int = 1
    """Responses per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    max_tokens: int = 256
    """Most response tokens per sample."""
    seed: Optional[int] = None
    """Base seed; prompt i uses seed + i, so a call is reproducible. None = engine RNG."""
    stop: tuple = ()
    """Stop strings (excluded from the text, as vLLM does); EOS always stops."""
    repetition_penalty: float = 1.0
    """HF/vLLM repetition penalty over prompt and generated tokens (1.0 = off; the SPARK evaluation uses 1.05)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenizedRequest:
    """A prompt already rendered to token ids (chat template applied), with its images for VL models."""

    prompt: Prompt
    token_ids: list
    images: list = field(default_factory=list)
    """ImageRef (or already loaded PIL images), in placeholder order."""


Request = Union[Prompt, TokenizedRequest]


class ChatRenderer:
    """Prompt -> token ids through the HF tokenizer's chat template (text), with the generation prompt."""

    def __init__(self, tokenizer, max_prompt_tokens: Optional[int] = None):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens

    def render(self, request: Request) -> TokenizedRequest:
        if isinstance(request, TokenizedRequest):
            return request
        text = self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
            raise ValueError(f"prompt '{request.uid}': {len(ids)} tokens exceed max_prompt_tokens "
                             f"{self.max_prompt_tokens}")
        return TokenizedRequest(request, ids, list(request.images))


def token_request(token_ids: Sequence[int], uid: str = "tokens") -> TokenizedRequest:
    """A request given only as token ids (a placeholder Prompt carries the uid)."""
    return TokenizedRequest(Prompt(uid=uid, messages=[], ground_truth=""), list(token_ids))


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine."""

    policy_version: int
    """Version of the weights now loaded (set by every committed push; stamped on every Rollout)."""

    def generate(self, requests: Sequence[Request], params: SamplingSpec) -> list:
        """-> one RolloutGroup per request, with token ids, text, per-token logprobs, finish reason, version.

        Logprobs are those of the sampling distribution: log softmax(logits / temperature) of the sampled token
        (temperature 1 for greedy calls), as the trainer's actor and reference compute them."""

    def score(self, sequences: Sequence[Sequence[int]]) -> list:
        """-> per sequence a float32 tensor [len - 1]: log p(token[t+1] | tokens[:t+1])."""

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self, tags: Optional[list] = None) -> None: ...


class WeightVersioning:
    """Shared weight-update bookkeeping of in-process engines (the `sync.push.WeightLoader` side): version, stale
    state after a failed push, asleep flag. Subclasses provide `hf_dir`, `dtype`, `packed_modules()` and
    `load_bucket(named_tensors)`, which a `sync.EngineSink` calls between `begin_update` and `finish_update` /
    `abort_update`."""

    policy_version: int = 0
    bucket_bytes: int = 512 << 20

    def _init_versioning(self, bucket_bytes: int) -> None:
        self.policy_version = 0
        self.bucket_bytes = bucket_bytes
        self.stale: Optional[str] = None
        self.asleep: Optional[int] = None
        self._updating: Optional[int] = None

    def packed_modules(self):
        """The engine's module fusion table; None = sync's default (Qwen2's q/k/v and gate/up)."""
        return None

    def begin_update(self, version: int) -> None:
        self._updating = version

    def abort_update(self, reason: str, dirty: bool) -> None:
        self._updating = None
        if dirty:
            self.stale = f"a weight push failed after writing part of the weights ({reason}); push a complete " \
                         f"set before generating"

    def finish_update(self, version: int) -> None:
        self._updating = None
        self.stale = None
        self.policy_version = version

    def _check_servable(self) -> None:
        if self.stale:
            raise EngineStateError(self.stale)
        if self.asleep is not None:
            raise EngineStateError(f"engine is asleep (level {self.asleep}); call wake_up() first")


def build_engine(cfg, hf_dir, **kwargs) -> RolloutEngine:
    """RolloutConfig + HF directory -> an engine in this process (`cfg.engine`: vllm | hf); kwargs go to the
    engine class. An engine in its own process: `spark_megatron.sync.remote.RemoteEngine`."""
    if cfg.engine not in ("vllm", "hf"):
        raise ValueError(f"rollout.engine must be 'vllm' or 'hf', got '{cfg.engine}'")
    if cfg.engine == "vllm":
        from spark_megatron.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(hf_dir, cfg, **kwargs)
    from spark_megatron.rollout.hf_engine import HFEngine

    return HFEngine(hf_dir, cfg, **kwargs)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[s, vocab] logits, [s] next tokens -> [s] float32 logprobs."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)

