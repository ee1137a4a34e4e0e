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


def _layout_worker(rank, world, hf_dir, tp, pp, dist_opt):
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.train.actor import Actor
    from spark_megatron.train.reference import ReferenceModel

    init_distributed(tp=tp, pp=pp, seed=1)
    seqs = oracle.make_seqs(vocab=400)
    out = {}
    model_cfg, par, optim = oracle.configs(tp, pp, mbs=1, dist_opt=dist_opt)
    ref = ReferenceModel(model_cfg, par, str(hf_dir), micro_batch_size=2)
    out["ref_lp"], out["ref_ent"] = ref.compute_logprobs_and_entropy(seqs)
    for mbs in (1, 4):
        model_cfg, par, optim = oracle.configs(tp, pp, mbs=mbs, dist_opt=dist_opt)
        actor = Actor(model_cfg, par, optim, str(hf_dir), total_steps=10)
        if mbs == 1:
            out["lp"], out["ent"] = actor.compute_logprobs_and_entropy(seqs)
        out[f"m{mbs}"] = actor.optimizer_step(seqs, oracle.token_mean_loss)
        out[f"params{mbs}"] = oracle.exported(actor)
        if not dist_opt or world // (tp * pp) == 1:
            out[f"grads{mbs}"] = oracle.exported_grads(actor)
    skipped = actor.optimizer_step(seqs, oracle.nan_loss)
    out["skip"] = skipped
    out["params_after_skip"] = oracle.exported(actor)
    return oracle.portable(out)


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
        seqs = oracle.make_seqs(vocab=400)
        model = oracle.hf_model(hf_dir)
        with torch.no_grad():
            lps, ents = oracle.hf_logprobs_entropy(model, seqs)
        _HF_CACHE[hf_dir] = (seqs, lps, ents, *oracle.hf_step(hf_dir, seqs))
    return _HF_CACHE[hf_dir]


def _check_layout(hf_dir, results, expect_grads: bool):
    results = [oracle.restore(r) for r in results]
    seqs, lps, ents, loss, grads, norm, after = _oracle(hf_dir)
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
        assert m["kind/policy/sequences"] == 3 and m["kind/pointwise/sequences"] == 2
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
def tiny_untied(tmp_path_factory):
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2

    return str(write_tiny_qwen2(tmp_path_factory.mktemp("untied"), TinyQwen2Spec(num_hidden_layers=2)))


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2

    return str(write_tiny_qwen2(tmp_path_factory.mktemp("tied"),
                                TinyQwen2Spec(num_hidden_layers=2, tie_word_embeddings=True)))


def test_actor_tp2(tiny_untied):
    results = run_on_ranks(_layout_worker, 2, tiny_untied, 2, 1, True, timeout_s=300)
    _check_layout(tiny_untied, results, expect_grads=True)


def test_actor_pp2_tied(tiny_tied):
    results = run_on_ranks(_layout_worker, 2, tiny_tied, 1, 2, True, timeout_s=300)
    _check_layout(tiny_tied, results, expect_grads=True)


def test_actor_dp2(tiny_untied):
    results = run_on_ranks(_layout_worker, 2, tiny_untied, 1, 1, False, timeout_s=300)
    _check_layout(tiny_untied, results, expect_grads=True)
