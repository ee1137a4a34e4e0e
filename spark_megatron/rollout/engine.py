"""The rollout-engine contract: sampling spec, prompt rendering, the RolloutEngine protocol, weight versioning.

Engines (vLLM, HF reference) turn prompts into typed `Rollout`s, score fixed token sequences, and take weight
updates as streams of (hf_name, tensor). Every update goes through `spark_megatron.sync` (validate the whole
update, then load bucket by bucket) and stamps a policy version that every later rollout carries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from spark_megatron.types import ImageRef, Prompt


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

    @classmethod
    def from_config(cls, cfg, **overrides) -> "SamplingSpec":
        """From a RolloutConfig (n, temperature, top_p, max_response_tokens), then keyword overrides."""
        base = dict(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_tokens)
        base.update(overrides)
        return cls(**base)

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


def load_image(ref) -> "object":
    """ImageRef -> RGB PIL image (already loaded images pass through). VL engines may pass their own loader."""
    if not isinstance(ref, ImageRef):
        return ref
    from PIL import Image

    with Image.open(ref.path) as im:
        return im.convert("RGB")


VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
"""Placeholders of Qwen2.5-VL prompts: a response must never contain them (the actor would have to embed an image
there), so VL engines suppress them when sampling; the reported logprobs stay the raw model's."""


def vision_token_ids(tokenizer) -> list:
    """Ids of VISION_TOKENS that the tokenizer knows (empty for a tokenizer without them)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return [int(i) for i in ids if i is not None and i != unk]


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

    def update_weights(self, weights, version: int) -> None:
        """Load a full set of HF-named tensors (validated as a whole first); records `version`."""

    def weight_sink(self):
        """The spark_megatron.sync WeightSink that loads a push into this engine (pass it to
        `push_actor_weights(..., sink=engine.weight_sink())` on the rank that holds the engine)."""

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self, tags: Optional[list] = None) -> None: ...


class WeightVersioning:
    """Shared weight-update bookkeeping of in-process engines: version, stale state after a failed push, asleep
    flag. Subclasses provide `expected_weights()` and `load_bucket(named_tensors)`, which `EngineSink` calls
    between `begin_update` and `finish_update` / `abort_update`."""

    policy_version: int = 0
    bucket_bytes: int = 512 << 20

    def _init_versioning(self, bucket_bytes: int) -> None:
        self.policy_version = 0
        self.bucket_bytes = bucket_bytes
        self.stale: Optional[str] = None
        self.asleep: Optional[int] = None
        self._updating: Optional[int] = None

    def weight_sink(self):
        from spark_megatron.sync.push import EngineSink

        return EngineSink(self)

    def update_weights(self, weights, version: int, bucket_bytes: Optional[int] = None):
        """Validate the whole update against the engine's table, then load it bucket by bucket."""
        from spark_megatron.sync.push import push_source

        return push_source([self.weight_sink()], weights, version, bucket_bytes or self.bucket_bytes)

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


def build_engine(cfg, hf_dir, own_process: Optional[bool] = None, **kwargs) -> RolloutEngine:
    """RolloutConfig + HF directory -> engine (`cfg.engine`: vllm | hf). kwargs go to the engine class.

    `own_process`: run the engine in a spawned process behind a `RemoteEngine` proxy. Default (None): for vLLM
    without CUDA inside an initialised torch.distributed world of more than one rank, where an in-process vLLM
    would hang building its own world group; in-process otherwise.
    """
    if cfg.engine not in ("vllm", "hf"):
        raise ValueError(f"rollout.engine must be 'vllm' or 'hf', got '{cfg.engine}'")
    if own_process is None:
        import torch.distributed as dist

        own_process = cfg.engine == "vllm" and not torch.cuda.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1
    if own_process:
        from spark_megatron.rollout.remote import RemoteEngine

        return RemoteEngine(cfg, hf_dir, **kwargs)
    if cfg.engine == "vllm":
        from spark_megatron.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(hf_dir, cfg, **kwargs)
    from spark_megatron.rollout.hf_engine import HFEngine

    return HFEngine(hf_dir, cfg, **kwargs)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[s, vocab] logits, [s] next tokens -> [s] float32 logprobs."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)

