"""The vision placeholder tokens of Qwen2.5-VL prompts."""
from __future__ import annotations

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
"""Placeholders of Qwen2.5-VL prompts: a response must never contain them (the actor would have to embed an image
there), so VL engines suppress them when sampling and training sequences mask them; the reported logprobs stay
the raw model's."""


def vision_token_ids(tokenizer) -> list:
    """Ids of VISION_TOKENS that the tokenizer knows (empty for a tokenizer without them)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return [int(i) for i in ids if i is not None and i != unk]
