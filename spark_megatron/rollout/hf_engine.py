"""Reference rollout engine on HF `transformers` generate: the independent oracle vLLM is checked against.

Slow (one prompt at a time, no paged KV cache) but simple: greedy and top-p sampling through `generate`,
logprobs of the sampling distribution, log softmax(logits / temperature) of each step (what the trainer computes,
and vLLM's `processed_logprobs` at top_p = 1), scores from one forward.
Weight updates go through the same validated, bucketed path as vLLM's.

Qwen2.5-VL checkpoints load as Qwen2_5_VLForConditionalGeneration: images are prepared by the same
`vision.ImagePreprocessor` the actor uses (so rollouts and training see identical pixels and token counts), the
prompt's <|image_pad|> placeholders are expanded to each image's token count (the Rollout's prompt ids carry them
expanded, as vLLM's do), and pushes map checkpoint names (`visual.*`, `model.*`) to the module's parameters. This
is the CPU path for VL rollouts and VL weight sync (vLLM's Qwen2.5-VL needs CUDA torchvision).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from spark_megatron.rollout.engine import (ChatRenderer, EngineStateError, SamplingSpec, TokenizedRequest,
                                           WeightVersioning, logprobs_from_logits)
from spark_megatron.types import Rollout, RolloutGroup
from spark_megatron.vision.tokens import vision_token_ids

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine(WeightVersioning):
    """RolloutEngine on a transformers causal LM (Qwen2 text) or Qwen2.5-VL."""

    supports_sleep = False

    def __init__(self, hf_dir, cfg=None, dtype: str = "float32", device: str = "cpu",
                 bucket_bytes: Optional[int] = None, seed: int = 0):
        """`seed` drives requests sampled without their own seed (a private generator: the caller's global RNG
        is left alone), so the same sequence of calls gives the same samples."""
        from transformers import AutoConfig, AutoTokenizer

        self.hf_dir = str(hf_dir)
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        config = AutoConfig.from_pretrained(self.hf_dir)
        self.vision = _VisionInputs(self.hf_dir, config, self.tokenizer) if config.model_type == "qwen2_5_vl" else None
        """None for text models."""
        model_cls = self.vision.model_class() if self.vision is not None else _causal_lm()
        self.model = model_cls.from_pretrained(self.hf_dir, dtype=self.dtype).to(self.device).eval()
        self.renderer = ChatRenderer(self.tokenizer, getattr(cfg, "max_prompt_tokens", None))
        mb = getattr(cfg, "sync_bucket_mb", 512)
        self._init_versioning(bucket_bytes or mb << 20)
        self._params = None
        self._seeds = torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_bucket(self, named_tensors: list) -> None:
        if self._params is None:
            params = dict(self.model.named_parameters())
            tied = getattr(self.model.config, "tie_word_embeddings", False)
            if tied and "lm_head.weight" not in params:
                params["lm_head.weight"] = self.model.get_output_embeddings().weight
            # keyed by checkpoint name: what pushes (and the validation table) use
            by_module = self.vision.module_name if self.vision is not None else (lambda n: n)
            self._params = {n: params[by_module(n)] for n in _checkpoint_names(self.hf_dir)}
        for name, t in named_tensors:
            self._params[name].copy_(t)

    def named_checkpoint_tensors(self) -> dict:
        """{checkpoint name: the engine's live parameter} (what a push writes; for tests and debugging)."""
        if self._params is None:
            self.load_bucket([])
        return dict(self._params)

    def sleep(self, level: int = 1) -> None:
        self.asleep = level  # nothing to offload: the flag keeps the engine protocol's semantics

    def wake_up(self, tags: Optional[list] = None) -> None:
        self.asleep = None

    # ------------------------------------------------------------------------------------------ serving
    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]]) -> list:
        self._check_servable()
        out = []
        for seq in sequences:
            ids = torch.tensor([list(seq)], device=self.device)
            logits = self.model(input_ids=ids).logits[0, :-1]
            out.append(logprobs_from_logits(logits, ids[0, 1:]).cpu())
        return out

    def generate(self, requests: Sequence, params: SamplingSpec) -> list:
        self._check_servable()
        groups = []
        for i, req in enumerate(requests):
            tok = self.renderer.render(req)
            if tok.images and self.vision is None:
                raise EngineStateError(f"prompt '{tok.prompt.uid}' has images but {self.hf_dir} is a text model")
            seed = int(torch.randint(2**31 - 1, (1,), generator=self._seeds)) if params.seed is None \
                else params.seed + i
            groups.append(RolloutGroup(tok.prompt, self._generate_one(tok, params, seed)))
        return groups

    @torch.no_grad()
    def _generate_one(self, tok: TokenizedRequest, params: SamplingSpec, seed: int) -> list:
        kw = {}
        if tok.images:
            token_ids, kw = self.vision.inputs(tok, self.device)
            tok = TokenizedRequest(tok.prompt, token_ids, tok.images)
        ids = torch.tensor([tok.token_ids], device=self.device)
        kw.update(max_new_tokens=params.max_tokens, do_sample=not params.greedy, num_return_sequences=params.n,
                  output_logits=True, return_dict_in_generate=True, eos_token_id=self.tokenizer.eos_token_id,
                  pad_token_id=self.tokenizer.pad_token_id, attention_mask=torch.ones_like(ids))
        if not params.greedy:
            kw.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.stop:
            kw.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if params.repetition_penalty != 1.0:
            kw.update(repetition_penalty=params.repetition_penalty)
        if self.vision is not None:
            kw.update(suppress_tokens=self.vision.suppressed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.model.generate(ids, **kw)
        steps = torch.stack(out.logits, dim=1)  # [n, steps, vocab] raw (unprocessed) logits
        return [self._rollout(tok, out.sequences[j, ids.shape[1]:], steps[j], params) for j in range(params.n)]

    def _rollout(self, tok: TokenizedRequest, gen: torch.Tensor, logits: torch.Tensor,
                 params: SamplingSpec) -> Rollout:
        eos = self.tokenizer.eos_token_id
        ids = gen.tolist()
        finish = "length"
        if eos in ids:
            ids, finish = ids[: ids.index(eos) + 1], "stop"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in params.stop:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
                break
        if finish == "length" and len(ids) < params.max_tokens:
            finish = "stop"  # generate ended early without EOS: a stop string fired
        temperature = params.temperature if not params.greedy else 1.0
        targets = torch.tensor(ids, device=logits.device)
        lps = logprobs_from_logits(logits[: len(ids)] / temperature, targets).tolist()
        return Rollout(prompt=tok.prompt, prompt_token_ids=list(tok.token_ids), response_token_ids=ids,
                       response_text=text, logprobs=lps, finish_reason=finish, policy_version=self.policy_version)


def _checkpoint_names(hf_dir: str) -> list:
    """Tensor names of a safetensors checkpoint (headers only)."""
    from spark_megatron.models.weights import HFCheckpointReader

    return list(HFCheckpointReader(hf_dir).keys())


def _causal_lm():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


class _VisionInputs:
    """Qwen2.5-VL prompt preparation for `generate`: images -> pixels + grids, placeholders expanded."""

    def __init__(self, hf_dir: str, config, tokenizer):
        from spark_megatron.vision import ImagePreprocessor

        self.preprocessor = ImagePreprocessor(hf_dir)
        self.image_token_id = int(config.image_token_id)
        self.suppressed = vision_token_ids(tokenizer)
        """Vision placeholder ids, never sampled (see vision.tokens.VISION_TOKENS)."""

    @staticmethod
    def model_class():
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @staticmethod
    def module_name(checkpoint_name: str) -> str:
        from spark_megatron.models.qwen2_5_vl_mapping import hf_module_name

        return hf_module_name(checkpoint_name)

    def inputs(self, tok: TokenizedRequest, device) -> tuple:
        """-> (prompt ids with expanded image pads, generate kwargs)."""
        from spark_megatron.types import ImageRef
        from spark_megatron.vision import expand_image_pads

        prepared = [self.preprocessor.prepare(im.path, min_pixels=im.min_pixels, max_pixels=im.max_pixels)
                    if isinstance(im, ImageRef) else self.preprocessor.prepare(im) for im in tok.images]
        ids = expand_image_pads(list(tok.token_ids), prepared, self.image_token_id, record=f"prompt '{tok.prompt.uid}'")
        t = torch.tensor([ids], device=device)
        return ids, dict(pixel_values=torch.cat([p.pixel_values for p in prepared]).to(device),
                         image_grid_thw=torch.tensor([p.grid_thw for p in prepared], device=device),
                         mm_token_type_ids=(t == self.image_token_id).int())
