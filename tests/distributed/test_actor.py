"""Actor / ReferenceModel on real gloo ranks against the HF transformers oracle.

One spawned job per layout (TP2, PP2 with tied embeddings, DP2) checks: logprobs and entropies of ragged
sequences == HF (fp32), the reference model agrees, one optimizer step with micro-batch size 1 and 4 gives the
same gradients / parameters as HF autograd + a hand-made clipped torch Adam step, and a non-finite loss skips
the step without touching the parameters.
"""
from __future__ import annotations

import pytest
import torch

from spark_megatron.parallel.spawn import run_on_ranks
from tests.distributed import actor_oracle as oracle

pytestmark = pytest.mark.distributed
TOL = 1e-5


N_SEQS = 10
LAYOUTS = {"tp2": (2, 1, True, "untied"), "pp2_tied": (1, 2, True, "tied"), "dp2": (1, 1, False, "untied"),
           "dp2_distopt": (1, 1, True, "untied")}
"""name -> (TP, PP, distributed optimizer, model); DP = 2 / (TP x PP). Gradients are compared where every rank
holds the full reduced gradients (DP = 1, or the plain optimizer); the distributed optimizer at DP2 only keeps
its own shard reduced, so there the parameters after the step are compared."""


def _layout_worker(rank, world, hf_dirs):
    """All layouts in one job (the parallel state is rebuilt per layout): spawning costs more than the work."""
    from spark_megatron.parallel.groups import init_distributed

    out = {}
    for name, (tp, pp, dist_opt, model) in LAYOUTS.items():
        init_distributed(tp=tp, pp=pp, seed=1)
        out[name] = oracle.portable(_one_layout(hf_dirs[model], tp, pp, dist_opt, world))
        if tp == 2:
            out["vocab_parallel"] = _vocab_parallel_grads()
        if name == "dp2_distopt":
            out["train_step"] = _train_step(hf_dirs[model], tp, pp, dist_opt)
    init_distributed(tp=2, pp=1, seed=1)
    out["bf16"] = oracle.portable(_bf16(hf_dirs["untied"]))
    return out


def _one_layout(hf_dir, tp, pp, dist_opt, world):
    from spark_megatron.train.actor import Actor
    from spark_megatron.train.reference import ReferenceModel

    seqs = oracle.make_seqs(vocab=400, n=N_SEQS)
    out = {}
    model_cfg, par, optim = oracle.configs(tp, pp, mbs=1, dist_opt=dist_opt)
    ref = ReferenceModel(model_cfg, par, hf_dir, micro_batch_size=1)  # PP2: 10 sequences -> 2 length buckets
    out["ref_lp"], out["ref_ent"] = ref.compute_logprobs_and_entropy(seqs)
    for mbs in (1, 4):
        model_cfg, par, optim = oracle.configs(tp, pp, mbs=mbs, dist_opt=dist_opt)
        actor = Actor(model_cfg, par, optim, hf_dir, total_steps=10, logprob_micro_batch_size=3)
        if mbs == 1:
            out["lp"], out["ent"] = actor.compute_logprobs_and_entropy(seqs)
        out[f"m{mbs}"] = actor.optimizer_step(seqs, oracle.token_mean_loss)
        out[f"params{mbs}"] = oracle.exported(actor)
        if not dist_opt or world // (tp * pp) == 1:
            out[f"grads{mbs}"] = oracle.exported_grads(actor)
    out["skip"] = actor.optimizer_step(seqs, oracle.nan_loss)
    out["params_after_skip"] = oracle.exported(actor)
    return out


def _train_step(hf_dir, tp, pp, dist_opt) -> dict:
    """A whole RL update: 10 sequences -> mini-batches of 4, 4, 2; old logprobs filled before the first step."""
    from spark_megatron.train.actor import Actor

    seqs = oracle.make_seqs(vocab=400, n=N_SEQS)
    actor = Actor(*oracle.configs(tp, pp, mbs=2, dist_opt=dist_opt, train_batch_size=4), hf_dir, total_steps=10)
    seen = []

    def loss_fn(logprobs, entropy, extras):
        gap = ((logprobs.detach() - extras["old_logprobs"]).abs() * extras["response_mask"]).max()
        seen.append(float(gap))
        return oracle.token_mean_loss(logprobs, entropy, extras)

    metrics = actor.train_step(seqs, loss_fn)
    return {"metrics": metrics, "gaps": seen, "untouched": all(s.old_logprobs is None for s in seqs)}


def _vocab_parallel_grads() -> dict:
    """TP2 logprob + entropy (values and gradients) of a padded vocabulary vs full-vocab autograd."""
    from megatron.core import parallel_state as ps

    from spark_megatron.train.logprobs import vocab_parallel_logprobs

    torch.manual_seed(5)
    vocab, padded = 441, 512
    full = torch.randn(2, 6, padded) * 3
    labels = torch.randint(0, vocab, (2, 6))
    local = padded // 2
    part = slice(ps.get_tensor_model_parallel_rank() * local, (ps.get_tensor_model_parallel_rank() + 1) * local)
    x = full[..., part].clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(x, labels, vocab, with_entropy=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    ref = full.clone().double().requires_grad_(True)
    logp = torch.log_softmax(ref[..., :vocab], dim=-1)
    r_lp, r_ent = logp.gather(-1, labels[..., None])[..., 0], -(logp.exp() * logp).sum(-1)
    (r_lp.sum() + 0.5 * r_ent.sum()).backward()
    return {"lp": float((lp - r_lp).abs().max()), "ent": float((ent - r_ent).abs().max()),
            "grad": float((x.grad - ref.grad[..., part]).abs().max())}


def _bf16(hf_dir):
    """bf16 weights (Float16Module + fp32 main params in the distributed optimizer): close to fp32 HF."""
    from spark_megatron.config import ModelConfig
    from spark_megatron.train.actor import Actor

    seqs = oracle.make_seqs(vocab=400, n=4)
    _, par, optim = oracle.configs(2, 1, mbs=2)
    actor = Actor(ModelConfig(params_dtype="bfloat16"), par, optim, hf_dir, total_steps=10)
    lp = actor.compute_logprobs(seqs)
    metrics = [actor.optimizer_step(seqs, oracle.token_mean_loss) for _ in range(2)]
    return {"lp": lp, "metrics": metrics, "lp_after": actor.compute_logprobs(seqs)}


def _merge(results, key) -> dict:
    merged = {}
    for r in results:
        merged.update(r.get(key, {}))
    return merged


_HF_CACHE: dict = {}


def _assert_adam_close(got, want, grad, where):
    """A first Adam step moves each weight by ~lr * g / (|g| + eps): where |g| is within a few orders of eps
    that ratio amplifies float noise in g, so there only the bound |update| <= lr is checked."""
    diff = (got - want).abs()
    cond = grad.abs() > 1e-6
    worst = float(torch.where(cond, diff, torch.zeros_like(diff)).max())
    assert worst < 2e-6, (where, worst)
    assert float(diff.max()) <= 2.01 * oracle.LR, (where, float(diff.max()))


def _oracle(hf_dir):
    if hf_dir not in _HF_CACHE:
        seqs = oracle.make_seqs(vocab=400, n=N_SEQS)
        model = oracle.hf_model(hf_dir)
        with torch.no_grad():
            lps, ents = oracle.hf_logprobs_entropy(model, seqs)
        _HF_CACHE[hf_dir] = (seqs, lps, ents, *oracle.hf_step(hf_dir, seqs))
    return _HF_CACHE[hf_dir]


def _check_layout(hf_dir, results):
    expect_grads = "grads1" in results[0]
    seqs, lps, ents, loss, grads, norm, after = _oracle(hf_dir)
    kinds = {k: sum(1 for s in seqs if s.kind == k) for k in ("policy", "pointwise")}
    for r in results:  # every rank holds every sequence's values
        for i, s in enumerate(seqs):
            assert r["lp"][i].shape == (s.response_len,)
            assert torch.allclose(r["lp"][i], lps[i], atol=TOL, rtol=0), (i, (r["lp"][i] - lps[i]).abs().max())
            assert torch.allclose(r["ent"][i], ents[i], atol=TOL, rtol=0), (i, (r["ent"][i] - ents[i]).abs().max())
            # the reference scores with another micro-batch size (other padding): equal up to float noise
            assert torch.allclose(r["ref_lp"][i], r["lp"][i], atol=1e-6, rtol=0)
            assert torch.allclose(r["ref_ent"][i], r["ent"][i], atol=1e-6, rtol=0)
    for mbs in (1, 4):
        m = results[0][f"m{mbs}"]
        assert m["skipped"] == 0.0
        assert abs(m["loss"] - loss) < 1e-6, (mbs, m["loss"], loss)
        assert abs(m["grad_norm"] - norm) / norm < 1e-5, (mbs, m["grad_norm"], norm)
        assert m["lr"] == oracle.LR
        assert m["global_tokens"] == sum(s.response_len for s in seqs)
        assert m["kind/policy/sequences"] == kinds["policy"] and m["kind/pointwise/sequences"] == kinds["pointwise"]
        if expect_grads:  # the step clipped the reduced gradients in place
            coeff = min(1.0, oracle.CLIP / (norm + 1e-6))
            g = _merge(results, f"grads{mbs}")
            assert set(g) == set(grads), set(g) ^ set(grads)
            for k, v in g.items():
                want = grads[k] * coeff
                scale = float(want.abs().max().clamp(min=1e-6))
                assert torch.allclose(v, want, atol=1e-5 * scale, rtol=0), (mbs, k, (v - want).abs().max())
        params = _merge(results, f"params{mbs}")
        assert set(params) == set(after), set(params) ^ set(after)
        for k, v in params.items():
            _assert_adam_close(v, after[k], grads[k], (mbs, k))
    p1, p4 = _merge(results, "params1"), _merge(results, "params4")
    for k in p1:
        _assert_adam_close(p1[k], p4[k], grads[k], ("mbs1 vs mbs4", k))
    skip = results[0]["skip"]
    assert skip["skipped"] == 1.0 and not skip["grad_norm"] == skip["grad_norm"]
    after_skip = _merge(results, "params_after_skip")
    for k in p4:
        assert torch.equal(after_skip[k], p4[k]), k


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2

    return {name: str(write_tiny_qwen2(tmp_path_factory.mktemp(name),
                                       TinyQwen2Spec(num_hidden_layers=2, tie_word_embeddings=name == "tied")))
            for name in ("untied", "tied")}


@pytest.fixture(scope="module")
def ranks(hf_dirs):
    results = run_on_ranks(_layout_worker, 2, hf_dirs, timeout_s=600)
    return [{k: oracle.restore(v) for k, v in r.items()} for r in results]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_actor_matches_hf(layout, ranks, hf_dirs):
    """logprobs / entropy, reference model, gradients, Adam step (mbs 1 and 4), non-finite skip."""
    _check_layout(hf_dirs[LAYOUTS[layout][3]], [r[layout] for r in ranks])


def test_train_step_splits_minibatches(ranks):
    for r in ranks:
        out = r["train_step"]
        assert out["metrics"]["optimizer_steps"] == 3 and out["metrics"]["skipped"] == 0
        assert out["metrics"]["sequences"] == N_SEQS and out["untouched"]
        # one micro-batch per rank and step: the first step sees old == current policy, later ones do not
        assert len(out["gaps"]) == 3 and out["gaps"][0] < 1e-5 and min(out["gaps"][1:]) > 1e-4, out["gaps"]


def test_vocab_parallel_tp2_gradients(ranks):
    for r in ranks:
        assert max(r["vocab_parallel"].values()) < 1e-5, r["vocab_parallel"]


def test_actor_bf16(ranks, hf_dirs):
    seqs, lps, *_ = _oracle(hf_dirs["untied"])
    out = ranks[0]["bf16"]
    for i in range(len(out["lp"])):
        assert (out["lp"][i] - lps[i]).abs().max() < 0.1  # bf16 weights and activations vs fp32 HF
    for m in out["metrics"]:
        assert m["skipped"] == 0.0 and m["grad_norm"] > 0 and m["loss"] == m["loss"]
    moved = max(float((a - b).abs().max()) for a, b in zip(out["lp"], out["lp_after"]))
    assert moved > 1e-3  # the bf16 parameters really changed
