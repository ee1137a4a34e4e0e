"""Prompt lengths in tokens, counted exactly as the rollout engines count them (chat template with the generation
prompt, then the tokenizer without special tokens: rollout.engine.ChatRenderer), so a prompt kept here is never
refused by an engine for its length."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

BATCH = 256
"""Prompts rendered per tokenizer call (fast tokenizers encode a batch in parallel)."""


def prompt_token_counts(tokenizer, prompts: Sequence) -> list:
    """Token count of each prompt's rendered chat (image placeholders count as the template writes them)."""
    counts = []
    for i in range(0, len(prompts), BATCH):
        texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + BATCH]]
        counts += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return counts


@dataclass
class LengthFilter:
    """Prompts over `max_tokens` are dropped (and listed), never handed to an engine that would refuse them."""

    max_tokens: int
    kept: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    """(uid, token count) of every dropped prompt, in data order."""

    def apply(self, tokenizer, prompts: Sequence) -> list:
        for p, n in zip(prompts, prompt_token_counts(tokenizer, prompts)):
            if n > self.max_tokens:
                self.dropped.append((p.uid, n))
            else:
                self.kept.append(p)
        return self.kept

    def summary(self) -> str:
        if not self.dropped:
            return f"all prompts fit rollout.max_prompt_tokens={self.max_tokens}"
        uid, n = max(self.dropped, key=lambda d: d[1])
        return (f"{len(self.dropped)} prompt(s) longer than rollout.max_prompt_tokens={self.max_tokens} dropped "
                f"(longest: {uid}, {n} tokens)")


def filter_by_length(tokenizer, prompts: Sequence, max_tokens: int) -> LengthFilter:
    """Split `prompts` into those that fit `max_tokens` and the dropped ones."""
    f = LengthFilter(max_tokens)
    f.apply(tokenizer, prompts)
    return f
