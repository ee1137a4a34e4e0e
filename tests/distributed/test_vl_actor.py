"""The actor on Qwen2.5-VL (real gloo ranks) against HF transformers Qwen2_5_VLForConditionalGeneration.

Batch: one-image, two-image (different sizes), text-only and a second one-image sequence. Checks:
1. Actor / ReferenceModel logprobs == HF per token (fp32) at TP2 and PP2; micro-batch size 1 vs 3 agree.
2. One train_step (token-mean loss, trainable tower) at TP2: reduced gradients and the clipped Adam update
   == HF autograd + a hand-made torch Adam step, at micro-batch size 1 (each image encoded per micro-batch)
   and 4 (image a repeats inside one micro-batch: encoded once, gradients summed), and at PP2 (mbs 2, tower
   on stage 0 only); with model.freeze_vision
   the vision parameters are bit-identical after the step, the LM moved as HF with a frozen tower says.
3. The image cache: a forward-only pass over a group of 4 sequences on one image runs the tower once (4
   times uncached) with identical logprobs; with a frozen tower it also serves the training forward.
"""
from __future__ import annotations

import pytest
import torch

from spark_megatron.parallel.spawn import run_on_ranks
from tests.distributed import actor_oracle as oracle
from tests.distributed import vl_actor_oracle as vl

pytestmark = pytest.mark.distributed
TOL = 1e-4
GROUP = [("a",)] * 4
"""A GRPO group: 4 rollouts of one prompt, so 4 sequences on the same image."""


def _tower_calls(runner) -> list:
    """A counter of vision-tower forward calls on this rank (stays [0] off the first pipeline stage)."""
    calls = [0]
    tower = getattr(runner.model_chunks[0], "vision_model", None)
    if tower is not None:
        tower.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _cache_check(hf_dir, actor, cfgs) -> dict:
    """Group of 4 on one image, micro-batch size 1 (4 micro-batches): cached vs uncached actor. (Both are
    Actors: a ReferenceModel's parameters are not views into DDP buffers, which moves results by ~5e-7.)"""
    from spark_megatron.train.actor import Actor

    group = vl.make_vl_seqs(hf_dir, GROUP, seed=3)
    calls = _tower_calls(actor)
    encoded = actor.image_cache.images_encoded
    cached = actor.compute_logprobs(group)
    plain_actor = Actor(*cfgs, hf_dir, total_steps=10, logprob_micro_batch_size=1, cache_images=False)
    plain_calls = _tower_calls(plain_actor)
    plain = plain_actor.compute_logprobs(group)
    return {"cached": cached, "plain": plain, "calls": calls[0], "plain_calls": plain_calls[0],
            "encoded": actor.image_cache.images_encoded - encoded, "first_stage": actor.vl.first_stage}


def _logprob_worker(rank, world, hf_dir):
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.train.actor import Actor
    from spark_megatron.train.reference import ReferenceModel

    out = {}
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        init_distributed(tp=tp, pp=pp, seed=1)
        seqs = vl.make_vl_seqs(hf_dir)
        cfgs = oracle.configs(tp, pp, mbs=1)
        actor = Actor(*cfgs, hf_dir, total_steps=10, logprob_micro_batch_size=1)
        res = {"actor": actor.compute_logprobs(seqs)}
        # micro-batch size 3: padded rows of different lengths, several images per micro-batch, a filler row
        for mbs in (1, 3):
            res[f"ref{mbs}"] = ReferenceModel(cfgs[0], cfgs[1], hf_dir, micro_batch_size=mbs).compute_logprobs(seqs)
        if name == "tp2":
            res["cache"] = _cache_check(hf_dir, actor, cfgs)
        out[name] = oracle.portable(res)
    return out


def _train_worker(rank, world, hf_dir):
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.train.actor import Actor

    seqs = vl.make_vl_seqs(hf_dir)
    out = {}
    # PP2 (tower on stage 0 only; megatron's PP grad finalisation on the VL module) first, then TP2
    for (tp, pp), mbs in (((1, 2), 2), ((2, 1), 1), ((2, 1), 4)):
        init_distributed(tp=tp, pp=pp, seed=1)
        actor = Actor(*oracle.configs(tp, pp, mbs=mbs), hf_dir, total_steps=10)
        out[f"m{mbs}"] = actor.train_step(seqs, oracle.token_mean_loss)
        out[f"grads{mbs}"] = oracle.exported_grads(actor)
        out[f"params{mbs}"] = oracle.exported(actor)
        out[f"encoded{mbs}"] = actor.image_cache.images_encoded
    model_cfg, par, optim = oracle.configs(2, 1, mbs=1)
    model_cfg.freeze_vision = True
    actor = Actor(model_cfg, par, optim, hf_dir, total_steps=10)
    out["frozen_before"] = oracle.exported(actor)
    out["frozen"] = actor.train_step(seqs, oracle.token_mean_loss)
    out["frozen_after"] = oracle.exported(actor)
    out["frozen_encoded"] = actor.image_cache.images_encoded
    tower = list(actor.model_chunks[0].vision_model.parameters())
    # no DDP grad buffer (main_grad) means no optimizer state: megatron builds both from trainable params only
    out["frozen_vision_in_ddp"] = sum(p.requires_grad or hasattr(p, "main_grad") for p in tower)
    return oracle.portable(out)


# ------------------------------------------------------------------------------------------------ parent side
@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    from spark_megatron.models.tiny_vl_checkpoint import write_tiny_qwen2_5_vl

    return str(write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl_actor")))


@pytest.fixture(scope="module")
def logprob_results(vl_dir):
    return [oracle.restore(r) for r in run_on_ranks(_logprob_worker, 2, vl_dir, timeout_s=240)]


@pytest.fixture(scope="module")
def train_results(vl_dir):
    return [oracle.restore(r) for r in run_on_ranks(_train_worker, 2, vl_dir, timeout_s=240)]


def _max_diff(a: list, b: list) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.timeout(300)
def test_vl_logprobs_match_hf(vl_dir, logprob_results):
    with torch.no_grad():
        want = vl.hf_vl_logprobs(vl.hf_vl_model(vl_dir), vl.make_vl_seqs(vl_dir))
    for layout in ("tp2", "pp2"):
        for r in logprob_results:  # every rank holds every sequence's values
            diffs = {k: _max_diff(r[layout][k], want) for k in ("actor", "ref1", "ref3")}
            assert max(diffs.values()) <= TOL, (layout, diffs)
            d13 = _max_diff(r[layout]["ref1"], r[layout]["ref3"])
            assert d13 <= 2e-6, (layout, d13)  # other padding / images per micro-batch: a few ulp at most
            # the actor's parameters are views into DDP buffers (other memory layout): float noise at most
            assert _max_diff(r[layout]["actor"], r[layout]["ref1"]) <= 2e-6
        print(f"{layout}: max |lp - HF| {diffs}; |mbs1 - mbs3| {d13:.2e}")


@pytest.mark.timeout(300)
def test_vl_image_cache_encodes_once(vl_dir, logprob_results):
    with torch.no_grad():
        want = vl.hf_vl_logprobs(vl.hf_vl_model(vl_dir), vl.make_vl_seqs(vl_dir, GROUP, seed=3))
    for r in logprob_results:
        c = r["tp2"]["cache"]
        assert c["first_stage"]  # TP2: both ranks hold the tower
        assert (c["calls"], c["encoded"], c["plain_calls"]) == (1, 1, 4), c
        assert all(torch.equal(a, b) for a, b in zip(c["cached"], c["plain"]))
        assert _max_diff(c["cached"], want) <= TOL
    print(f"group of 4: tower calls cached {c['calls']} vs uncached {c['plain_calls']}; "
          f"max |lp - HF| {_max_diff(c['cached'], want):.2e}")


def _assert_adam_close(got, want, grad, where):
    """As in test_actor: a first Adam step moves each weight by ~lr * g / (|g| + eps), which amplifies float
    noise where |g| is near eps; there only the bound |update| <= lr is checked."""
    diff = (got - want).abs()
    worst = float(torch.where(grad.abs() > 1e-6, diff, torch.zeros_like(diff)).max())
    assert worst < 2e-6, (where, worst)
    assert float(diff.max()) <= 2.01 * oracle.LR, (where, float(diff.max()))


def _merged(results, key) -> dict:
    out = {}
    for r in results:
        out.update(vl.by_module_name(r[key]))
    return out


@pytest.mark.timeout(300)
def test_vl_train_step_matches_hf(vl_dir, train_results):
    seqs = vl.make_vl_seqs(vl_dir)
    loss, grads, norm, after = vl.hf_vl_step(vl_dir, seqs)
    coeff = min(1.0, oracle.CLIP / (norm + 1e-6))
    worst = {}
    for mbs in (1, 4, 2):  # 1, 4: TP2; 2: PP2
        m = train_results[0][f"m{mbs}"]
        assert m["skipped"] == 0.0 and m["optimizer_steps"] == 1.0
        assert abs(m["loss"] - loss) < 1e-6, (mbs, m["loss"], loss)
        assert abs(m["grad_norm"] - norm) / norm < 1e-5, (mbs, m["grad_norm"], norm)
        g = _merged(train_results, f"grads{mbs}")
        assert set(g) == set(grads), set(g) ^ set(grads)
        for k, v in g.items():  # the step clipped the reduced gradients in place
            want = grads[k] * coeff
            scale = float(want.abs().max().clamp(min=1e-6))
            rel = float((v - want).abs().max()) / scale
            worst[mbs] = max(worst.get(mbs, 0.0), rel)
            assert rel <= 1e-5, (mbs, k, rel)
        assert any(k.startswith("model.visual.") and float(v.abs().max()) > 0 for k, v in g.items())
        for k, v in _merged(train_results, f"params{mbs}").items():
            _assert_adam_close(v, after[k], grads[k], (mbs, k))
    # mbs 1: a, a+b, a in three micro-batches, no reuse across them while the tower trains; mbs 4: a once
    assert [train_results[0][f"encoded{m}"] for m in (1, 4)] == [4, 2]
    print(f"train step: max relative grad diff (TP2 mbs1, TP2 mbs4, PP2 mbs2) {worst}, grad norm {norm:.4f}")


@pytest.mark.timeout(300)
def test_vl_freeze_vision(vl_dir, train_results):
    seqs = vl.make_vl_seqs(vl_dir)
    loss, grads, norm, after = vl.hf_vl_step(vl_dir, seqs, freeze_vision=True)
    r0 = train_results[0]
    assert r0["frozen_vision_in_ddp"] == 0
    assert abs(r0["frozen"]["grad_norm"] - norm) / norm < 1e-5, (r0["frozen"]["grad_norm"], norm)
    before, after_step = _merged(train_results, "frozen_before"), _merged(train_results, "frozen_after")
    vision = [k for k in before if k.startswith("model.visual.")]
    assert vision and all(torch.equal(before[k], after_step[k]) for k in vision)
    moved = [k for k in before if k not in vision and not torch.equal(before[k], after_step[k])]
    assert len(moved) == len(before) - len(vision), set(before) - set(vision) - set(moved)
    for k in moved:
        _assert_adam_close(after_step[k], after[k], grads[k], ("frozen", k))
    # frozen tower: the training forward reuses features across micro-batches too (a, b once each)
    assert r0["frozen_encoded"] == 2


# ------------------------------------------------------------------------------------------------ in-process
def test_vl_batch_checks_name_the_sequence(vl_dir):
    """Mismatched images and placeholders fail up front on every rank (no ranks needed for the checks)."""
    import dataclasses
    import re

    from spark_megatron.models.families import load_family
    from spark_megatron.train.batching import BatchError
    from spark_megatron.train.vl_inputs import VLInputs, check_overlap, check_text_only

    _, shape = load_family(vl_dir)
    inputs = VLInputs(shape.image_token_id, shape.vision.spatial_merge_size, True)
    check = inputs.check
    seqs = vl.make_vl_seqs(vl_dir)
    check(seqs)
    bad = [(dataclasses.replace(seqs[1], images=seqs[1].images[:1]), "2 <|image_pad|> runs but 1 images"),
           (dataclasses.replace(seqs[1], images=seqs[1].images[::-1]), "needs"),
           (dataclasses.replace(seqs[2], tokens=list(seqs[2].tokens) + [shape.image_token_id]),
            "inside the response")]
    for s, msg in bad:
        with pytest.raises(BatchError, match=re.escape(msg)) as err:
            check([seqs[0], s])
        assert "sequence 1" in str(err.value)
    with pytest.raises(BatchError, match=re.escape("sequence 0: carries 1 images but the model is text-only")):
        check_text_only(seqs)
    with pytest.raises(ValueError, match="freeze_vision"):  # overlapped grad reduce needs a frozen tower
        check_overlap(inputs, False, True)
    check_overlap(inputs, True, True)
    check_overlap(None, False, True)


def test_sequence_builder_shares_prepared_images(vl_dir, tmp_path):
    """A group's rollouts (and another prompt on the same file) carry the same PreparedImage objects."""
    import numpy as np
    from PIL import Image

    from spark_megatron.config import AlgorithmConfig, RolloutConfig
    from spark_megatron.sequences import SequenceBuilder
    from spark_megatron.types import ImageRef, Prompt, Rollout, RolloutGroup, Verdict
    from spark_megatron.vision import ImagePreprocessor

    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)

    def group(uid, images, rewards):
        p = Prompt(uid=uid, messages=[], ground_truth="1", images=images)
        return RolloutGroup(p, [Rollout(p, [1, 2], [7, 8], "x", verdict=Verdict("1", r > 0, r)) for r in rewards])

    groups = [group("a", [ImageRef(str(path))], [1.0, 0.0]), group("b", [ImageRef(str(path))], [0.0, 1.0]),
              group("c", [], [1.0, 0.0])]
    builder = SequenceBuilder(None, AlgorithmConfig(), RolloutConfig(), image_preprocessor=ImagePreprocessor(vl_dir))
    seqs = builder.build(groups)
    assert [len(s.images or []) for s in seqs] == [1, 1, 1, 1, 0, 0]
    assert len({id(s.images[0]) for s in seqs[:4]}) == 1
    assert SequenceBuilder(None, AlgorithmConfig(), RolloutConfig()).build(groups)[0].images is None


def test_sequence_builder_cuts_a_vl_response_before_a_vision_token(vl_dir):
    """An engine that lets a vision placeholder through: the trained response (and its logprobs) stop before it,
    so the actor never has to embed an image inside a response; text models keep the response whole."""
    from transformers import AutoTokenizer

    from spark_megatron.config import AlgorithmConfig, RolloutConfig
    from spark_megatron.sequences import SequenceBuilder
    from spark_megatron.types import Prompt, Rollout, RolloutGroup, Verdict
    from spark_megatron.vision import ImagePreprocessor

    tok = AutoTokenizer.from_pretrained(vl_dir)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    p = Prompt(uid="t", messages=[], ground_truth="1")
    rollout = Rollout(p, [1, 2], [7, 8, pad, 9], "x", logprobs=[-0.1, -0.2, -0.3, -0.4], verdict=Verdict("1", True, 1.0))
    groups = [RolloutGroup(p, [rollout, Rollout(p, [1, 2], [7], "y", logprobs=[-0.5], verdict=Verdict(None, False, 0.0))])]
    vl = SequenceBuilder(tok, AlgorithmConfig(), RolloutConfig(), image_preprocessor=ImagePreprocessor(vl_dir)).build(groups)
    assert vl[0].tokens == [1, 2, 7, 8] and vl[0].rollout_logprobs == [-0.1, -0.2] and len(vl[0].advantages) == 2
    text = SequenceBuilder(tok, AlgorithmConfig(), RolloutConfig()).build(groups)
    assert text[0].tokens == [1, 2, 7, 8, pad, 9]
