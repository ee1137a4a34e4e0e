"""Reference rollout engine on HF `transformers` generate: the independent oracle vLLM is checked against.

Slow (one prompt at a time, no paged KV cache) but simple: greedy and top-p sampling through `generate`,
logprobs from the raw logits of each step (vLLM's default `raw_logprobs` semantics), scores from one forward.
Weight updates go through the same validated, bucketed path as vLLM's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from spark_megatron.rollout.engine import (ChatRenderer, EngineStateError, SamplingSpec, TokenizedRequest,
                                           WeightVersioning, logprobs_from_logits)
from spark_megatron.types import Rollout, RolloutGroup

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine(WeightVersioning):
    """RolloutEngine on a transformers causal LM (text models)."""

    supports_sleep = False

    def __init__(self, hf_dir, cfg=None, dtype: str = "float32", device: str = "cpu",
                 bucket_bytes: Optional[int] = None, seed: int = 0):
        """`seed` drives requests sampled without their own seed (a private generator: the caller's global RNG
        is left alone), so the same sequence of calls gives the same samples."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.hf_dir = str(hf_dir)
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.hf_dir, dtype=self.dtype).to(self.device).eval()
        self.renderer = ChatRenderer(self.tokenizer, getattr(cfg, "max_prompt_tokens", None))
        mb = getattr(cfg, "sync_bucket_mb", 512)
        self._init_versioning(bucket_bytes or mb << 20)
        self._expected = None
        self._params = None
        self._seeds = torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------------------------------ weights
    def expected_weights(self):
        from spark_megatron.sync.validation import ExpectedWeights

        if self._expected is None:
            self._expected = ExpectedWeights.from_hf_dir(self.hf_dir, self.dtype)
        return self._expected

    @torch.no_grad()
    def load_bucket(self, named_tensors: list) -> None:
        if self._params is None:
            self._params = dict(self.model.named_parameters())
            tied = getattr(self.model.config, "tie_word_embeddings", False)
            if tied and "lm_head.weight" not in self._params:
                self._params["lm_head.weight"] = self.model.get_output_embeddings().weight
        for name, t in named_tensors:
            self._params[name].copy_(t)

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
            if tok.images:
                raise EngineStateError("HFEngine serves text models only; use the vLLM engine for images")
            seed = int(torch.randint(2**31 - 1, (1,), generator=self._seeds)) if params.seed is None \
                else params.seed + i
            groups.append(RolloutGroup(tok.prompt, self._generate_one(tok, params, seed)))
        return groups

    @torch.no_grad()
    def _generate_one(self, tok: TokenizedRequest, params: SamplingSpec, seed: int) -> list:
        ids = torch.tensor([tok.token_ids], device=self.device)
        kw = dict(max_new_tokens=params.max_tokens, do_sample=not params.greedy, num_return_sequences=params.n,
                  output_logits=True, return_dict_in_generate=True, eos_token_id=self.tokenizer.eos_token_id,
                  pad_token_id=self.tokenizer.pad_token_id, attention_mask=torch.ones_like(ids))
        if not params.greedy:
            kw.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.stop:
            kw.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
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
        lps = logprobs_from_logits(logits[: len(ids)], torch.tensor(ids, device=logits.device)).tolist()
        return Rollout(prompt=tok.prompt, prompt_token_ids=list(tok.token_ids), response_token_ids=ids,
                       response_text=text, logprobs=lps, finish_reason=finish, policy_version=self.policy_version)
