"""Megatron actors (gloo ranks, TP2 then PP2) push perturbed weights into a real vLLM engine; checked against the
actor's own logprobs and the HF reference engine.

Process layout: vLLM cannot live in a rank of the gloo job (it would build its world group on top of the job's
default group, whose new_group calls need every rank). So, like the disaggregated rollout layout, the engines
(vLLM + HF reference) live in this pytest process and the actor's rank 0 streams buckets to them over a side gloo
group (`SyncChannel`); at PP2 the second stage's buckets travel point-to-point to rank 0 first.
"""
from __future__ import annotations

import threading
import zlib

import pytest
import torch

from spark_megatron.parallel.spawn import free_port, run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]

TOL = 1e-4
"""Max |logprob diff| between vLLM (fp32) and the Megatron actor (fp32) on the same token sequences."""
BUCKET_BYTES = 256 << 10
LAYOUTS = ((2, 1, 1, 11), (1, 2, 2, 22))
"""(TP, PP, version pushed, noise seed) of the actor, run one after the other in one spawned job."""
GREEDY_TOKENS = 12


def _sequences(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (3, 16), generator=g)


def _perturb(model, seed: int, scale: float = 0.02) -> None:
    """Training-like update: seeded noise on every parameter; replicated parameters get the same noise on every
    TP rank, TP shards get per-shard noise (so the model stays well defined)."""
    from megatron.core import parallel_state as ps

    from spark_megatron.models.weights import global_param_names

    tp_rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in global_param_names(model):
            shard = tp_rank if getattr(p, "tensor_model_parallel", False) else 0
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{shard}".encode()))
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _megatron_logprobs(model, tokens: torch.Tensor, vocab: int):
    from spark_megatron.models.parity import megatron_forward

    logits, _ = megatron_forward(model, tokens, vocab)
    if logits is None:
        return None
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def _actor_job(rank, world, hf_dir, port):
    """Each layout: build + load the actor, perturb, record logprobs, push (version v), then a bf16 push that the
    fp32 engines must reject on every rank."""
    from tests.helpers import loaded_qwen2_stage
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.sync import LiveBytes, WeightValidationError, push_actor_weights
    from spark_megatron.sync.channel import ChannelSink, SyncChannel

    sink = ChannelSink(SyncChannel.connect("127.0.0.1", port, 0, 2, is_master=False, timeout_s=180)) \
        if rank == 0 else None
    out = {}
    for tp, pp, version, seed in LAYOUTS:
        init_distributed(tp, pp)
        shape, registry, model = loaded_qwen2_stage(hf_dir)
        _perturb(model, seed)
        logprobs = _megatron_logprobs(model, _sequences(shape.vocab_size), shape.vocab_size)
        tracker = LiveBytes()
        stats = push_actor_weights([model], registry, version, BUCKET_BYTES, sink=sink,
                                   tied=shape.tie_word_embeddings, dtype=torch.float32, tracker=tracker)
        try:
            push_actor_weights([model], registry, version + 100, BUCKET_BYTES, sink=sink,
                               tied=shape.tie_word_embeddings, dtype=torch.bfloat16)
            rejected = None
        except WeightValidationError as e:
            rejected = str(e)
        out[version] = dict(logprobs=logprobs, rejected=rejected, buckets=stats.buckets, bytes=stats.bytes,
                            peak=tracker.peak, transient=tracker.largest_transient,
                            capacity=stats.bucket_capacity)
    if sink is not None:
        sink.close()
    return out


def _probe(vllm, hf, prompts, seqs):
    from spark_megatron.rollout import SamplingSpec

    greedy = SamplingSpec(n=1, temperature=0.0, max_tokens=GREEDY_TOKENS)
    return dict(version=vllm.policy_version, v_score=vllm.score(seqs), h_score=hf.score(seqs),
                v_greedy=[g.rollouts[0].response_token_ids for g in vllm.generate(prompts, greedy)],
                h_greedy=[g.rollouts[0].response_token_ids for g in hf.generate(prompts, greedy)],
                v_versions=[g.rollouts[0].policy_version for g in vllm.generate(prompts[:1], greedy)])


def _serve_while(job, channel_port, engines, on_commit):
    """Run the actor job in a thread while this process serves the channel; job errors take precedence."""
    from spark_megatron.sync import EngineSink
    from spark_megatron.sync.channel import SyncChannel, serve_weight_updates

    result = {}

    def target():
        try:
            result["ranks"] = run_on_ranks(*job, timeout_s=300)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        channel = SyncChannel.connect("127.0.0.1", channel_port, 1, 2, is_master=True, timeout_s=180)
        outcomes = serve_weight_updates(channel, [EngineSink(e) for e in engines], on_commit=on_commit)
    except BaseException:
        t.join(timeout=300)
        if "error" in result:
            raise result["error"]
        raise
    t.join(timeout=300)
    if "error" in result:
        raise result["error"]
    return outcomes, result["ranks"]


def test_actor_tp2_pp2_push_into_vllm_matches_actor_and_hf(tmp_path):
    from spark_megatron.config import RolloutConfig
    from spark_megatron.models.tiny_checkpoint import write_tiny_qwen2
    from spark_megatron.rollout.hf_engine import HFEngine
    from spark_megatron.rollout.vllm_engine import VLLMEngine
    from spark_megatron.sync import CheckpointSource, push_into
    from spark_megatron.types import Prompt

    hf_dir = write_tiny_qwen2(tmp_path / "tiny")
    cfg = RolloutConfig(max_prompt_tokens=128, max_response_tokens=32, tensor_parallel_size=1)
    vllm = VLLMEngine(hf_dir, cfg, dtype="float32")
    try:
        hf = HFEngine(hf_dir, cfg)
        seqs = _sequences(hf.model.config.vocab_size).tolist()
        prompts = [Prompt(uid=f"q{i}", messages=[{"role": "user", "content": f"What is {i} + {i + 2}?"}],
                          ground_truth="") for i in range(2)]
        base = _probe(vllm, hf, prompts, seqs)
        probes = {}
        outcomes, ranks = _serve_while((_actor_job, 2, str(hf_dir), port := free_port()), port, [vllm, hf],
                                       lambda v: probes.__setitem__(v, _probe(vllm, hf, prompts, seqs)))
        assert outcomes == {"committed": 2, "rejected": 2}
        for tp, pp, version, _ in LAYOUTS:
            _check_layout(f"TP{tp} PP{pp}", base, probes[version], ranks, version)
        # the original checkpoint pushed back restores vLLM's original outputs exactly
        push_into(vllm, CheckpointSource(hf_dir), version=3)
        push_into(hf, CheckpointSource(hf_dir), version=3)
        restored = _probe(vllm, hf, prompts, seqs)
        assert all(torch.equal(a, b) for a, b in zip(restored["v_score"], base["v_score"]))
        assert restored["v_greedy"] == base["v_greedy"] and restored["version"] == 3
    finally:
        vllm.shutdown()


def _check_layout(name, base, probe, ranks, version):
    actor = next(r[version]["logprobs"] for r in ranks if r[version]["logprobs"] is not None)
    v_score = torch.stack(probe["v_score"])
    diff = (v_score - actor).abs().max().item()
    h_diff = (torch.stack(probe["h_score"]) - actor).abs().max().item()
    moved = (v_score - torch.stack(base["v_score"])).abs().max().item()
    print(f"{name}: |vLLM - Megatron| {diff:.2e}, |HF - Megatron| {h_diff:.2e}, push moved logprobs by {moved:.2e}")
    assert diff <= TOL, f"{name}: vLLM vs Megatron logprobs differ by {diff:.2e}"
    assert h_diff <= TOL, f"{name}: HF vs Megatron logprobs differ by {h_diff:.2e}"
    assert moved > 1e-2, f"{name}: the push did not change vLLM's outputs ({moved:.2e})"
    assert probe["v_greedy"] == probe["h_greedy"], f"{name}: vLLM vs HF greedy tokens differ"
    assert probe["version"] == version and probe["v_versions"] == [version]
    for r in ranks:
        msg = r[version]["rejected"]
        assert msg and "bfloat16" in msg and "'model." in msg, f"{name}: bf16 push not rejected by name: {msg}"
    for rank, r in enumerate(ranks):
        info = r[version]
        assert info["capacity"] <= BUCKET_BYTES
        assert info["peak"] <= info["capacity"] + info["transient"], f"{name} rank {rank}: {info}"
        assert info["peak"] < info["bytes"] / 4, f"{name} rank {rank}: push held {info['peak']} bytes"


def _colocated_job(rank, world, hf_dir):
    """PP2 actor with one HF reference engine per rank (the colocated layout): every bucket is broadcast from its
    stage leader and loaded on every rank; then a bf16 push is rejected on every rank before anything is written."""
    from spark_megatron.config import RolloutConfig
    from tests.helpers import loaded_qwen2_stage
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.rollout.hf_engine import HFEngine
    from spark_megatron.sync import EngineSink, WeightValidationError, push_actor_weights
    from spark_megatron.sync import actor_plan

    init_distributed(1, 2)
    shape, registry, model = loaded_qwen2_stage(hf_dir)
    _perturb(model, seed=33)
    seqs = _sequences(shape.vocab_size)
    engine = HFEngine(hf_dir, RolloutConfig(engine="hf"))
    stages = {p.pp_rank for p in actor_plan([model], registry, BUCKET_BYTES, dtype=torch.float32).sources}
    push_actor_weights([model], registry, 5, BUCKET_BYTES, sink=EngineSink(engine), dtype=torch.float32,
                       delivery="broadcast")
    after_push = torch.stack(engine.score(seqs.tolist()))
    try:
        push_actor_weights([model], registry, 6, BUCKET_BYTES, sink=EngineSink(engine), dtype=torch.bfloat16,
                           delivery="broadcast")
        rejected = None
    except WeightValidationError as e:
        rejected = str(e)
    unchanged = torch.equal(after_push, torch.stack(engine.score(seqs.tolist())))
    return dict(actor=_megatron_logprobs(model, seqs, shape.vocab_size), engine=after_push, stages=stages,
                version=engine.policy_version, rejected=rejected, unchanged=unchanged)


def test_colocated_broadcast_delivery_loads_every_ranks_engine(tmp_path):
    from spark_megatron.models.tiny_checkpoint import write_tiny_qwen2

    hf_dir = write_tiny_qwen2(tmp_path / "tiny")
    ranks = run_on_ranks(_colocated_job, 2, str(hf_dir), timeout_s=300)
    actor = ranks[1]["actor"]  # last pipeline stage
    for rank, r in enumerate(ranks):
        assert r["stages"] == {0, 1}
        diff = (r["engine"] - actor).abs().max().item()
        assert diff <= TOL, f"rank {rank}: engine vs Megatron logprobs differ by {diff:.2e}"
        assert r["version"] == 5 and r["unchanged"] and "bfloat16" in r["rejected"]


def _inprocess_job(rank, world, hf_dir):
    """World of one (the CPU quickstart layout): Megatron TP1 actor and vLLM in the same process, direct sink."""
    from spark_megatron.config import RolloutConfig
    from tests.helpers import loaded_qwen2_stage
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.rollout.vllm_engine import VLLMEngine
    from spark_megatron.sync import EngineSink, push_actor_weights

    init_distributed(1, 1)
    shape, registry, model = loaded_qwen2_stage(hf_dir)
    engine = VLLMEngine(hf_dir, RolloutConfig(max_prompt_tokens=64, max_response_tokens=16), dtype="float32")
    seqs = _sequences(shape.vocab_size)
    before = torch.stack(engine.score(seqs.tolist()))
    _perturb(model, seed=44)
    push_actor_weights([model], registry, 1, BUCKET_BYTES, sink=EngineSink(engine), dtype=torch.float32)
    after = torch.stack(engine.score(seqs.tolist()))
    actor = _megatron_logprobs(model, seqs, shape.vocab_size)
    engine.shutdown()
    return dict(diff=(after - actor).abs().max().item(), moved=(after - before).abs().max().item())


def test_single_process_actor_pushes_into_inprocess_vllm(tmp_path):
    from spark_megatron.models.tiny_checkpoint import write_tiny_qwen2

    hf_dir = write_tiny_qwen2(tmp_path / "tiny")
    r = run_on_ranks(_inprocess_job, 1, str(hf_dir), timeout_s=300)[0]
    assert r["diff"] <= TOL and r["moved"] > 1e-2, r


def _remote_job(rank, world, hf_dir):
    """TP2 actor; rank 0 drives a vLLM engine living in its own process (RemoteEngine): push, score, generate,
    and a rejected bf16 push, all through the proxy."""
    from spark_megatron.config import RolloutConfig
    from tests.helpers import loaded_qwen2_stage
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.rollout import SamplingSpec, token_request
    from spark_megatron.sync.remote import RemoteEngine
    from spark_megatron.sync import WeightValidationError, push_actor_weights

    init_distributed(2, 1)
    shape, registry, model = loaded_qwen2_stage(hf_dir)
    remote = RemoteEngine(RolloutConfig(max_prompt_tokens=64, max_response_tokens=16), hf_dir, dtype="float32") \
        if rank == 0 else None
    seqs = _sequences(shape.vocab_size)
    _perturb(model, seed=55)
    sink = remote.weight_sink if remote is not None else (lambda: None)
    push_actor_weights([model], registry, 1, BUCKET_BYTES, sink=sink(), dtype=torch.float32)
    try:
        push_actor_weights([model], registry, 2, BUCKET_BYTES, sink=sink(), dtype=torch.bfloat16)
        rejected = None
    except WeightValidationError as e:
        rejected = str(e)
    actor = _megatron_logprobs(model, seqs, shape.vocab_size)
    out = dict(rejected=rejected)
    if remote is not None:
        from spark_megatron.rollout import RolloutEngine

        assert isinstance(remote, RolloutEngine)
        greedy = SamplingSpec(n=1, temperature=0.0, max_tokens=4)
        out.update(diff=(torch.stack(remote.score(seqs.tolist())) - actor).abs().max().item(),
                   version=remote.policy_version,
                   rollout_version=remote.generate([token_request([1, 2, 3])], greedy)[0].rollouts[0].policy_version)
        remote.shutdown()
    return out


def test_remote_engine_serves_a_multi_rank_actor(tmp_path):
    from spark_megatron.models.tiny_checkpoint import write_tiny_qwen2

    hf_dir = write_tiny_qwen2(tmp_path / "tiny")
    ranks = run_on_ranks(_remote_job, 2, str(hf_dir), timeout_s=300)
    r = ranks[0]
    assert r["diff"] <= TOL and r["version"] == 1 and r["rollout_version"] == 1, r
    assert all("bfloat16" in x["rejected"] for x in ranks)
