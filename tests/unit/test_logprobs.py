"""Per-token logprobs / entropy from (padded-vocab) logits and the sequence -> micro-batch packing that aligns
response tokens with the logits that predict them. Single process (TP = 1 parallel state on a 1-rank gloo
group); the TP2 reductions are checked against full-vocab autograd in tests/distributed/test_actor.py."""
from __future__ import annotations

import pytest
import torch

from spark_megatron.train import batching
from spark_megatron.train.batching import BatchError, SequenceSample

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tp1():
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from spark_megatron.parallel.spawn import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    ps.initialize_model_parallel(1, 1)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _reference(logits, labels, vocab):
    logp = torch.log_softmax(logits[..., :vocab].double(), dim=-1)
    return logp.gather(-1, labels[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def test_logprobs_and_entropy_ignore_padded_vocab(tp1):
    from spark_megatron.train.logprobs import vocab_parallel_logprobs

    torch.manual_seed(0)
    vocab, padded = 441, 512
    logits = torch.randn(2, 7, padded) * 3
    logits[..., vocab:] = 5.0  # padding columns with large logits must get no probability mass
    labels = torch.randint(0, vocab, (2, 7))
    want_lp, want_ent = _reference(logits, labels, vocab)
    x = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(x, labels, vocab, with_entropy=True)
    assert torch.allclose(lp.double(), want_lp, atol=1e-5) and torch.allclose(ent.double(), want_ent, atol=1e-5)
    (lp.sum() + 0.5 * ent.sum()).backward()
    ref = logits.clone().double().requires_grad_(True)
    r_lp, r_ent = _reference(ref, labels, vocab)
    (r_lp.sum() + 0.5 * r_ent.sum()).backward()
    assert torch.allclose(x.grad.double(), ref.grad, atol=1e-5)
    assert float(x.grad[..., vocab:].abs().max()) == 0.0
    assert torch.equal(x.detach(), logits)  # the caller's logits are not overwritten when they need grads


def test_temperature_and_no_padding(tp1):
    from spark_megatron.train.logprobs import vocab_parallel_logprobs

    logits = torch.randn(3, 5, 64)
    labels = torch.randint(0, 64, (3, 5))
    lp, ent = vocab_parallel_logprobs(logits.clone(), labels, None, with_entropy=False, temperature=0.7)
    want, _ = _reference(logits / 0.7, labels, 64)
    assert ent is None and torch.allclose(lp.double(), want, atol=1e-5)


def _seq(tokens, prompt, **kw):
    return SequenceSample(tokens=tokens, prompt_len=prompt, **kw)


def test_response_alignment():
    s = _seq([10, 11, 12, 13, 14], 2, advantages=[1.0, 2.0, 3.0], old_logprobs=[-1.0, -2.0, -3.0])
    mb = batching.build_microbatch([s], [0], seq_len=8, fields=["advantages", "old_logprobs"])
    # position t predicts token t+1: response tokens 12, 13, 14 are read at positions 1, 2, 3
    assert mb.extras["response_mask"][0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert mb.extras["labels"][0, 1:4].tolist() == [12, 13, 14]
    assert mb.extras["advantages"][0, 1:4].tolist() == [1.0, 2.0, 3.0]
    assert mb.extras["old_logprobs"][0].tolist()[:5] == [0.0, -1.0, -2.0, -3.0, 0.0]
    assert mb.tokens[0].tolist() == [10, 11, 12, 13, 14, 0, 0, 0]
    assert mb.position_ids[0].tolist() == list(range(8))
    scalar = batching.build_microbatch([_seq([1, 2, 3], 1, advantages=0.5)], [0], 8, ["advantages"])
    assert scalar.extras["advantages"][0, :2].tolist() == [0.5, 0.5]


def test_microbatch_shapes_and_filler_rows():
    seqs = [_seq(list(range(1, n + 1)), 1) for n in (5, 30, 9, 17, 3)]
    uniform = batching.plan_microbatches(seqs, range(5), 2, uniform_shape=True)
    assert [tuple(m.tokens.shape) for m in uniform] == [(2, 32)] * 3
    assert uniform[0].rows == [1, 3] and uniform[-1].rows == [4, -1]  # longest first; a filler row
    assert float(uniform[-1].extras["response_mask"][1].sum()) == 0.0
    own = batching.plan_microbatches(seqs, range(5), 2, uniform_shape=False)
    assert [tuple(m.tokens.shape) for m in own] == [(2, 32), (2, 16), (1, 8)]
    empty = batching.plan_microbatches(seqs, [], 2, uniform_shape=False, min_microbatches=1)
    assert len(empty) == 1 and empty[0].rows == [-1] and float(empty[0].extras["response_mask"].sum()) == 0
    assert batching.padded_length(513) == 576 and batching.padded_length(9) == 16
    assert batching.padded_length(30, max_len=28) == 28


def test_data_parallel_shards_cover_everything_once():
    seqs = [_seq(list(range(1, n + 3)), 1) for n in range(11)]
    shards = [batching.shard_for_rank(range(11), seqs, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    tokens = [sum(len(seqs[i].tokens) for i in s) for s in shards]
    assert max(tokens) - min(tokens) <= 12  # snake order balances tokens
    assert batching.split_minibatches(5, 2) == [[0, 1], [2, 3], [4]]


def test_bad_sequences_are_named():
    with pytest.raises(BatchError, match="sequence 1: prompt_len 3"):
        batching.validate([_seq([1, 2, 3], 1), _seq([1, 2, 3], 3)])
    with pytest.raises(BatchError, match="sequence 0: 5 tokens exceed"):
        batching.validate([_seq([1] * 5, 1)], max_len=4)
    with pytest.raises(BatchError, match="sequence 1: 'ref_logprobs' is None"):
        batching.present_fields([_seq([1, 2], 1, ref_logprobs=[0.0]), _seq([1, 2], 1)])
    with pytest.raises(BatchError, match="sequence 0: 'advantages' has 1 values but the response has 2"):
        batching.build_microbatch([_seq([1, 2, 3], 1, advantages=[1.0])], [0], 4, ["advantages"])
    with pytest.raises(BatchError, match="non-finite"):
        batching.build_microbatch([_seq([1, 2], 1, old_logprobs=[float("nan")])], [0], 4, ["old_logprobs"])
