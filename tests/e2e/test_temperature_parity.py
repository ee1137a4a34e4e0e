"""Sampling temperature is applied wherever logprobs of sampled tokens are computed.

The trainer's roles (build_roles: vLLM engine, Megatron actor and frozen reference) at rollout.temperature=0.7,
fp32, tiny Qwen2: the logprob vLLM reports for each token it sampled equals the actor's and the reference's
logprob of that token within 1e-4, so the PPO ratio and the KL compare the distribution vLLM sampled from. vLLM's
default `logprobs_mode` (raw_logprobs) reports the untempered model; the engine asks for processed_logprobs
(after temperature; top-k/top-p would also renormalise, which is why the check runs at top_p = 1). The HF
reference engine agrees too. A scorer at temperature 1 misses by far more than the tolerance (the check can fail).
"""
from __future__ import annotations

import pytest

from spark_megatron.parallel.spawn import run_on_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.distributed]

TEMPERATURE = 0.7
TOL = 1e-4
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1",
       "VLLM_CPU_KVCACHE_SPACE": "1", "WANDB_MODE": "offline"}


def _prompts():
    from spark_megatron.types import Prompt

    return [Prompt(uid=f"p{i}", messages=[{"role": "user", "content": f"What is {i} + {3 * i}? Use \\boxed{{}}."}],
                   ground_truth=str(4 * i)) for i in range(3)]


def _gap(scorer, groups) -> float:
    """max |engine logprob - scorer logprob| over every sampled token of `groups`."""
    import torch

    from spark_megatron.train.batching import SequenceSample

    rollouts = [r for g in groups for r in g.rollouts]
    seqs = [SequenceSample(tokens=list(r.prompt_token_ids) + list(r.response_token_ids),
                           prompt_len=len(r.prompt_token_ids)) for r in rollouts]
    lps = scorer.compute_logprobs(seqs)
    return max(float((lp - torch.tensor(r.logprobs)).abs().max()) for lp, r in zip(lps, rollouts))


def parity_worker(rank, world, hf_dir):
    from spark_megatron.config import RunConfig
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.roles import build_roles
    from spark_megatron.rollout import SamplingSpec
    from spark_megatron.rollout.hf_engine import HFEngine
    from spark_megatron.train.reference import ReferenceModel

    init_distributed(1, 1, seed=1)
    cfg = RunConfig()
    cfg.model.hf_path, cfg.model.params_dtype = hf_dir, "float32"
    cfg.rollout.engine, cfg.rollout.temperature, cfg.rollout.top_p = "vllm", TEMPERATURE, 1.0
    cfg.rollout.n, cfg.rollout.max_prompt_tokens, cfg.rollout.max_response_tokens = 4, 128, 24
    cfg.rollout.sync_bucket_mb, cfg.algorithm.verify_workers, cfg.algorithm.kl_coef = 1, 0, 1e-3
    roles = build_roles(cfg, hf_dir, is_driver=True)
    try:
        sampling = SamplingSpec(n=4, temperature=TEMPERATURE, top_p=1.0, max_tokens=24, seed=3)
        groups = roles.engine.generate(_prompts(), sampling)
        out = {"engine_temperature": roles.sampling.temperature,
               "actor": _gap(roles.actor, groups), "reference": _gap(roles.reference, groups)}
        hf_groups = HFEngine(hf_dir, cfg.rollout).generate(_prompts(), sampling)
        out["hf_engine"] = _gap(roles.actor, hf_groups)
        untempered = ReferenceModel(cfg.model, cfg.parallel, hf_dir, logit_temperature=1.0)
        out["untempered"] = _gap(untempered, groups)
        out["tokens"] = sum(len(r.response_token_ids) for g in groups for r in g.rollouts)
        return out
    finally:
        roles.close()


def test_engine_logprobs_equal_actor_and_reference_at_temperature(tmp_path):
    from spark_megatron.models.tiny_checkpoint import write_tiny_qwen2

    hf_dir = str(write_tiny_qwen2(tmp_path / "tiny"))
    out = run_on_ranks(parity_worker, 1, hf_dir, timeout_s=600, env=ENV)[0]
    assert out["engine_temperature"] == TEMPERATURE and out["tokens"] >= 12 * 4
    assert out["actor"] <= TOL, out
    assert out["reference"] <= TOL, out
    assert out["hf_engine"] <= TOL, out
    assert out["untempered"] > 100 * TOL, out  # scoring without the temperature is caught
