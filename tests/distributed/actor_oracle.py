"""Shared pieces of the actor / train-state tests: ragged sequences, an HF-transformers oracle (logprobs,
entropy, token-mean loss gradients, one hand-made Adam step) and rank workers that report what they computed."""
from __future__ import annotations

import math

import torch

LR = 1e-3
BETAS = (0.9, 0.95)
EPS = 1e-8
CLIP = 0.5


def make_seqs(vocab: int, n: int = 5, seed: int = 0) -> list:
    """Ragged sequences (8..30 tokens, prompts of 2..7) with per-token advantages of both signs."""
    from spark_megatron.train.batching import SequenceSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(8, 31, (1,), generator=g))
        prompt = int(torch.randint(2, 8, (1,), generator=g))
        # no id 0: it is the tiny model's pad_token_id, whose HF embedding row (padding_idx) never gets a gradient
        tokens = torch.randint(1, vocab, (length,), generator=g).tolist()
        adv = torch.randn(length - prompt, generator=g).tolist()
        out.append(SequenceSample(tokens=tokens, prompt_len=prompt, advantages=adv,
                                  kind="policy" if i % 2 == 0 else "pointwise"))
    return out


def token_mean_loss(logprobs, entropy, extras):
    """-(sum of advantage x logprob over response tokens) / global token count, plus a diagnostic."""
    mask = extras["response_mask"]
    loss = -(extras["advantages"] * logprobs * mask).sum() / extras["global_token_count"]
    return loss, {"mean_logprob": ((logprobs * mask).sum() / mask.sum().clamp(min=1)).detach()}


def nan_loss(logprobs, entropy, extras):
    loss, metrics = token_mean_loss(logprobs, entropy, extras)
    return loss * float("nan"), metrics


# ------------------------------------------------------------------------------------------------ HF oracle
def hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def hf_logprobs_entropy(model, seqs) -> tuple:
    """Per-sequence response-token logprobs and entropies from unpadded single-sequence HF forwards."""
    lps, ents = [], []
    for s in seqs:
        ids = torch.tensor([s.tokens])
        logits = model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        p = s.prompt_len
        lps.append(logp[p - 1:-1].gather(-1, ids[0, p:, None])[:, 0])
        ents.append(-(logp.exp() * logp).sum(-1)[p - 1:-1])
    return lps, ents


def hf_step(hf_dir, seqs, clip: float = CLIP, lr: float = LR) -> tuple:
    """Loss, gradients (by HF name), grad norm and the parameters after one clipped Adam step, by hand."""
    model = hf_model(hf_dir)
    total = sum(s.response_len for s in seqs)
    loss = 0.0
    for s, lp in zip(seqs, hf_logprobs_entropy(model, seqs)[0]):
        loss = loss - (torch.tensor(s.advantages) * lp).sum() / total
    loss.backward()
    params = dict(model.named_parameters())
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    opt.step()
    after = {k: p.detach().clone() for k, p in params.items()}
    return float(loss.detach()), grads, norm, after


# ------------------------------------------------------------------------------------------------ rank side
def configs(tp: int, pp: int, mbs: int, dist_opt: bool = True, train_batch_size: int = 64, lr: float = LR):
    from spark_megatron.config import ModelConfig, OptimConfig, ParallelConfig

    return (ModelConfig(params_dtype="float32"),
            ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                           use_distributed_optimizer=dist_opt),
            OptimConfig(lr=lr, min_lr_ratio=0.1, warmup_ratio=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                        weight_decay=0.0, clip_grad=CLIP, micro_batch_size=mbs, train_batch_size=train_batch_size))


def exported(actor) -> dict:
    """This rank's stage as {hf_name: tensor} (TP gathered); the parent merges ranks."""
    return {k: v.clone() for k, v in actor.export_hf_stream()}


def exported_grads(actor) -> dict:
    """The reduced gradients (DDP main_grad), exported under HF names by temporarily viewing them as weights.

    Valid when every rank holds full gradients (no distributed optimizer, or DP = 1)."""
    saved = []
    for p in actor.model_chunks[0].parameters():
        saved.append(p.data)
        p.data = p.main_grad.view_as(p.data)
    try:
        return exported(actor)
    finally:
        for p, d in zip(actor.model_chunks[0].parameters(), saved):
            p.data = d


def portable(obj):
    """Tensors -> numpy (torch tensors in a multiprocessing queue travel as shared-memory handles that die with
    the rank process); back with `restore`."""
    if isinstance(obj, torch.Tensor):
        return ("__t__", obj.detach().cpu().numpy())
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v) for v in obj)
    return obj


def restore(obj):
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__t__":
        return torch.from_numpy(obj[1])
    if isinstance(obj, dict):
        return {k: restore(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(restore(v) for v in obj)
    return obj
