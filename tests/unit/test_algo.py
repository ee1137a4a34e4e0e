"""Advantages, PPO-clip, KL estimators, aggregation and the combined SPARK/GRPO loss."""
import math

import pytest
import torch

from spark_megatron.algo import (ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, aggregate_loss,
                                 compute_advantages, grpo_advantages, kl_penalty, ppo_clip_loss, spark_grpo_loss,
                                 token_advantages, truncated_is_weights)
from spark_megatron.config import AlgorithmConfig

pytestmark = pytest.mark.unit
F64 = torch.float64


# ------------------------------------------------------------------------------------------- advantages

def test_grpo_advantages_exact_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64)
    adv = grpo_advantages(r)
    s1 = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]: mean 0.5, every deviation 0.5
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=F64) / (s1 + 1e-9))
    s2 = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)
    assert torch.allclose(adv[1], torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=F64) / (s2 + 1e-9))


def test_grpo_advantages_biased_std_and_eps():
    r = torch.tensor([[1.0, 0.0]], dtype=F64)
    assert torch.allclose(grpo_advantages(r, unbiased=False), torch.tensor([[1.0, -1.0]], dtype=F64))
    assert torch.allclose(grpo_advantages(r, eps=1.0, unbiased=False), torch.tensor([[1 / 3, -1 / 3]], dtype=F64))


def test_equal_rewards_give_exactly_zero():
    r = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.3, 0.3, 0.3]])
    adv = grpo_advantages(r)
    assert torch.equal(adv, torch.zeros_like(adv))
    assert torch.equal(grpo_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))


def test_advantage_registry_and_config():
    assert set(ADVANTAGE_ESTIMATORS.names()) >= {"grpo", "grpo_mean_only"}
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=F64)
    assert torch.allclose(compute_advantages(r, AlgorithmConfig(adv_estimator="grpo_mean_only")),
                          torch.tensor([[0.75, -0.25, -0.25, -0.25]], dtype=F64))
    with pytest.raises(KeyError, match="did you mean 'grpo'"):
        ADVANTAGE_ESTIMATORS.get("grp")
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(4))


def test_token_advantages():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = token_advantages(torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------------- policy loss / KL

def test_ppo_clip_values_and_clip_flags():
    old = torch.zeros(1, 4, dtype=F64)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]], dtype=F64))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=F64)
    t = ppo_clip_loss(lp, old, adv, clip_low=0.2, clip_high=0.3)
    # ratio 1.5, A>0: min(1.5, 1.3) -> loss -1.3 (clipped high); ratio 0.5, A<0: -(-max(0.5,0.8)) -> 0.8 (clipped low)
    assert torch.allclose(t.loss, torch.tensor([[-1.3, 0.8, -1.1, 0.8]], dtype=F64))
    assert t.clipped_high.tolist() == [[True, False, False, False]]
    assert t.clipped_low.tolist() == [[False, True, False, True]]


def test_ppo_clip_gradient_is_zero_where_clipped():
    lp = torch.log(torch.tensor([[1.5, 1.1]], dtype=F64)).requires_grad_()
    ppo_clip_loss(lp, torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64)).loss.sum().backward()
    assert lp.grad[0, 0] == 0 and torch.isclose(lp.grad[0, 1], torch.tensor(-1.1, dtype=F64))


def test_kl_estimators():
    lp = torch.tensor([[-1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=F64)
    d = ref - lp
    assert torch.allclose(kl_penalty(lp, ref, "k1"), lp - ref)
    assert torch.allclose(kl_penalty(lp, ref, "k2"), 0.5 * (lp - ref) ** 2)
    assert torch.allclose(kl_penalty(lp, ref, "k3"), torch.exp(d) - d - 1)
    assert torch.equal(kl_penalty(lp, lp, "k3"), torch.zeros_like(lp))
    assert kl_penalty(torch.tensor([[-30.0]]), torch.tensor([[0.0]]), "k3").item() == 10.0
    assert "low_var_kl" in KL_ESTIMATORS


def test_truncated_is_weights():
    w = truncated_is_weights(torch.log(torch.tensor([[0.5, 0.9]])), torch.log(torch.tensor([[0.25, 0.9]])), cap=1.5)
    assert torch.allclose(w, torch.tensor([[1.5, 1.0]]))
    assert not w.requires_grad


# ------------------------------------------------------------------------------------------- aggregation

def test_aggregation_modes():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate_loss(v, m, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate_loss(v, m, "token-mean", global_token_count=7).item() == pytest.approx(1.0)
    assert aggregate_loss(v, m, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate_loss(v, m, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    assert aggregate_loss(v, m, "seq-mean-token-sum", global_seq_count=7).item() == pytest.approx(1.0)
    assert set(LOSS_AGGREGATIONS.names()) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum"}


# ------------------------------------------------------------------------------------------- combined loss

def _batch(seed=0, B=8, T=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    lp = (-torch.rand(B, T, generator=g, dtype=F64) * 3)
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    ref = lp + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    rollout = old + 0.1 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    return lp, old, ref, rollout, adv, mask


def _reference_loss(lp, old, ref, adv, mask, cfg, rollout=None):
    """Written out directly, without the library's helpers."""
    ratio = torch.exp(lp - old)
    a = adv[:, None]
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    if rollout is not None:
        pg = pg * torch.clamp(torch.exp(old - rollout), max=cfg.tis_cap)
    d = ref - lp
    k3 = torch.exp(d) - d - 1
    return ((pg + cfg.kl_coef * k3) * mask).sum() / mask.sum()


@pytest.mark.parametrize("tis", [None, 1.2])
def test_token_mean_invariant_to_micro_batch_split(tis):
    cfg = AlgorithmConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.05, tis_cap=tis)
    lp, old, ref, rollout, adv, mask = _batch()
    rollout = rollout if tis else None
    leaf_ref = lp.clone().requires_grad_()
    expected = _reference_loss(leaf_ref, old, ref, adv, mask, cfg, rollout)
    expected.backward()
    global_tokens = mask.sum()
    for n_micro, size in ((1, 8), (4, 2)):
        leaf = lp.clone().requires_grad_()
        total = torch.zeros((), dtype=F64)
        for k in range(n_micro):
            s = slice(k * size, (k + 1) * size)
            loss, metrics = spark_grpo_loss(leaf[s], old[s], ref[s], adv[s], mask[s], global_tokens, cfg,
                                            rollout_logprobs=None if rollout is None else rollout[s])
            loss.backward()
            total = total + loss.detach()
        assert torch.allclose(total, expected.detach(), rtol=1e-12, atol=1e-14), (n_micro, total, expected)
        assert torch.allclose(leaf.grad, leaf_ref.grad, rtol=1e-12, atol=1e-14), n_micro


def test_loss_metrics_and_kl_off():
    lp, old, ref, rollout, adv, mask = _batch(seed=1)
    cfg = AlgorithmConfig(kl_coef=0.0)
    loss, m = spark_grpo_loss(lp, old, ref, adv, mask, mask.sum(), cfg)
    assert "kl" not in m and torch.allclose(loss, m["pg_loss"])
    assert m["num_tokens"].item() == mask.sum().item()
    assert 0.0 <= m["clipfrac"].item() <= 1.0
    assert torch.allclose(m["clipfrac"], m["clipfrac_low"] + m["clipfrac_high"])
    cfg = AlgorithmConfig(kl_coef=0.1)
    loss, m = spark_grpo_loss(lp, old, ref, adv, mask, mask.sum(), cfg)
    assert torch.allclose(loss, m["pg_loss"] + m["kl_loss"])


def test_on_policy_loss_is_minus_mean_advantage():
    lp, _, _, _, adv, mask = _batch(seed=2)
    loss, m = spark_grpo_loss(lp, None, None, adv, mask, mask.sum(), AlgorithmConfig())
    expected = -(adv[:, None] * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected) and m["clipfrac"].item() == 0.0 and m["ratio_mean"].item() == 1.0


def test_seq_mean_aggregation_split_invariant():
    cfg = AlgorithmConfig(loss_agg="seq-mean-token-mean")
    lp, old, ref, _, adv, mask = _batch(seed=3)
    full, _ = spark_grpo_loss(lp, old, ref, adv, mask, None, cfg, global_seq_count=8)
    parts = sum(spark_grpo_loss(lp[s], old[s], ref[s], adv[s], mask[s], None, cfg, global_seq_count=8)[0]
                for s in (slice(0, 3), slice(3, 8)))
    assert torch.allclose(full, parts, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_masked_extreme_logprobs_give_finite_loss_and_gradients(estimator, dtype):
    """Masked positions holding extreme logprobs (-1e4, -inf, a reference of 0 against them) leave the loss and
    the gradient exactly as they are with ordinary values there: finite, and zero gradient at masked positions.
    Before the clamp, exp(ref - logp) overflowed there and 0 * inf made the whole gradient NaN."""
    cfg = AlgorithmConfig(kl_coef=0.5, kl_estimator=estimator)
    lp, old, ref, _, adv, mask = _batch(seed=4)
    lp, old, ref, adv, mask = (t.to(dtype) for t in (lp, old, ref, adv, mask))
    masked = mask == 0
    assert masked.any() and (~masked).any()
    runs = {}
    for name, extreme in (("ordinary", None), ("-1e4", -1e4), ("-inf", float("-inf"))):
        lp_in, old_in, ref_in = lp.clone(), old.clone(), ref.clone()
        if extreme is not None:
            lp_in[masked] = extreme
            old_in[masked] = extreme
            ref_in[masked] = 0.0
        leaf = lp_in.requires_grad_()
        loss, metrics = spark_grpo_loss(leaf, old_in, ref_in, adv, mask, mask.sum(), cfg)
        loss.backward()
        assert torch.isfinite(loss), (name, loss)
        assert torch.isfinite(leaf.grad).all(), name
        assert (leaf.grad[masked] == 0).all(), name
        assert all(torch.isfinite(v) for v in metrics.values()), (name, metrics)
        runs[name] = (loss.detach(), leaf.grad)
    for name in ("-1e4", "-inf"):
        assert torch.equal(runs[name][0], runs["ordinary"][0]), name
        assert torch.equal(runs[name][1], runs["ordinary"][1]), name


def test_kl_clamps_the_log_ratio_before_exp():
    """An unmasked token 30 nats below the reference: k3 is capped and its gradient finite (exp(30) would still
    be finite in fp32, but its gradient through the cap would not be zero without clamping first: the clamp at 20
    makes it exactly 0, as in verl)."""
    lp = torch.tensor([[-30.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.2]])
    k3 = kl_penalty(lp, ref, "k3")
    assert k3[0, 0].item() == 10.0
    k3.sum().backward()
    d = (ref - lp.detach())[0, 1]
    assert lp.grad[0, 0].item() == 0.0
    assert lp.grad[0, 1].item() == pytest.approx(float(1 - torch.exp(d)), rel=1e-6)
    assert kl_penalty(torch.tensor([[-1e30]]), torch.tensor([[0.0]]), "k1").item() == -20.0


def test_sequence_builder_uses_the_configured_advantage_estimator():
    from spark_megatron.config import RolloutConfig
    from spark_megatron.sequences import SequenceBuilder
    from spark_megatron.types import Prompt, Rollout, RolloutGroup, Verdict

    prompt = Prompt(uid="p", messages=[], ground_truth="1")
    group = RolloutGroup(prompt, [Rollout(prompt, [], [], "", verdict=Verdict(None, bool(r), float(r)))
                                  for r in (1, 0, 0, 1)])
    mean_only = SequenceBuilder(None, AlgorithmConfig(adv_estimator="grpo_mean_only"), RolloutConfig())
    assert mean_only.advantages([group])[0].tolist() == [0.5, -0.5, -0.5, 0.5]
    grpo = SequenceBuilder(None, AlgorithmConfig(adv_estimator="grpo"), RolloutConfig())
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert grpo.advantages([group])[0].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    with pytest.raises(KeyError, match="grpo_mean_only"):
        SequenceBuilder(None, AlgorithmConfig(adv_estimator="grpo_mean"), RolloutConfig())


def test_minibatch_order_is_a_seeded_shuffle_that_can_be_turned_off():
    from types import SimpleNamespace

    from spark_megatron.config import OptimConfig
    from spark_megatron.train.actor import Actor

    def order(shuffle=True, seed=1, steps_done=0, n=12):
        actor = SimpleNamespace(optim_cfg=OptimConfig(shuffle_minibatches=shuffle), seed=seed, steps_done=steps_done)
        return Actor.minibatch_order(actor, n)

    assert sorted(order()) == list(range(12)) and order() != list(range(12))
    assert order() == order()  # the same on every rank, and after a resume (steps_done is checkpointed)
    assert order(steps_done=8) != order() and order(seed=2) != order()
    assert order(shuffle=False) == list(range(12))
