"""Shared pieces of the VL actor tests: a batch mixing image and text sequences built from the tiny Qwen2.5-VL
checkpoint, and the HF transformers oracle (per-token logprobs, token-mean loss gradients, one clipped Adam step
by hand, optionally with the vision tower frozen)."""
from __future__ import annotations

import math

import torch

from tests.distributed import actor_oracle as oracle

IMAGE_SIZES = {"a": (90, 120), "b": (150, 64), "c": (60, 60)}
"""(height, width) of the random test images; a and b give different grids (two sizes in one prompt)."""
BATCH = [("a",), ("a", "b"), (), ("a",)]
"""Images of each sequence of the mixed batch: one image, two images of different sizes, text only, and one
more sequence on image a (a repeat inside a micro-batch when micro_batch_size > 1: the cache's dedup path)."""


def prepared_images(hf_dir) -> dict:
    """Deterministic random RGB images, preprocessed like the rollout side would (same on every process)."""
    import numpy as np
    from PIL import Image

    from spark_megatron.vision import ImagePreprocessor

    pre = ImagePreprocessor(hf_dir)
    rng = np.random.default_rng(0)
    return {k: pre.prepare(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), source=f"img_{k}")
            for k, (h, w) in IMAGE_SIZES.items()}


def make_vl_seqs(hf_dir, layout=BATCH, seed: int = 0) -> list:
    """One SequenceSample per entry of `layout`: chat prompt with the images' expanded pads, then a random
    response (ids >= 7: no special tokens) with per-token advantages of both signs."""
    from transformers import AutoTokenizer

    from spark_megatron.train.batching import SequenceSample
    from spark_megatron.vision import expand_image_pads

    tok = AutoTokenizer.from_pretrained(hf_dir)
    images = prepared_images(hf_dir)
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, names in enumerate(layout):
        imgs = [images[n] for n in names]
        body = "".join("<|vision_start|><|image_pad|><|vision_end|>" for _ in imgs)
        ids = tok(f"<|im_start|>user\n{body}question {i}: what is shown?<|im_end|>\n<|im_start|>assistant\n")
        prompt = expand_image_pads(ids["input_ids"], imgs, pad_id)
        n = int(torch.randint(4, 12, (1,), generator=g))
        response = torch.randint(7, len(tok), (n,), generator=g).tolist()
        adv = torch.randn(n, generator=g).tolist()
        out.append(SequenceSample(tokens=prompt + response, prompt_len=len(prompt), advantages=adv,
                                  images=imgs or None, kind="policy" if i % 2 == 0 else "pointwise"))
    return out


# ------------------------------------------------------------------------------------------------ HF oracle
def hf_vl_model(hf_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def hf_vl_logprobs(model, seqs) -> list:
    """Response-token logprobs from unpadded single-sequence HF forwards (HF computes its own rope index)."""
    image_token_id = model.config.image_token_id
    out = []
    for s in seqs:
        ids = torch.tensor([list(s.tokens)])
        kw = {}
        if s.images:
            kw = dict(pixel_values=torch.cat([im.pixel_values for im in s.images]),
                      image_grid_thw=torch.tensor([im.grid_thw for im in s.images]),
                      mm_token_type_ids=(ids == image_token_id).int())
        logp = torch.log_softmax(model(input_ids=ids, **kw).logits[0].float(), dim=-1)
        p = s.prompt_len
        out.append(logp[p - 1:-1].gather(-1, ids[0, p:, None])[:, 0])
    return out


def hf_vl_step(hf_dir, seqs, freeze_vision: bool = False) -> tuple:
    """(loss, grads by state-dict name, grad norm, params after one clipped Adam step) for the token-mean loss
    -(sum advantage x logprob) / total response tokens; a frozen tower gets no gradient and no update."""
    model = hf_vl_model(hf_dir)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    total = sum(s.response_len for s in seqs)
    loss = sum(-(torch.tensor(s.advantages) * lp).sum() / total for s, lp in zip(seqs, hf_vl_logprobs(model, seqs)))
    loss.backward()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    torch.nn.utils.clip_grad_norm_(list(params.values()), oracle.CLIP)
    opt = torch.optim.Adam(list(params.values()), lr=oracle.LR, betas=oracle.BETAS, eps=oracle.EPS,
                           weight_decay=0.0)
    opt.step()
    after = {k: p.detach().clone() for k, p in model.named_parameters()}
    return float(loss.detach()), grads, norm, after


def by_module_name(exported: dict) -> dict:
    """Exported checkpoint names -> Qwen2_5_VLForConditionalGeneration state-dict names."""
    from spark_megatron.models.qwen2_5_vl_mapping import hf_module_name

    return {hf_module_name(k): v for k, v in exported.items()}
