"""Fit recycled tasks to `rollout.max_prompt_tokens`: a judgment or reflection prompt quotes a policy response,
so it can be longer than any data prompt, and an engine refuses a prompt over the limit.

The rule: a task that fits is left alone. Otherwise every quoted chain of thought is cut to its last K tokens,
K the largest that makes the whole prompt fit (the same K for both responses of a pairwise task), shown as
"[...] <tail>"; when the response's final answer is not inside the kept tail, "Final answer: <answer>" is added
after it, so the judge still sees what the label is about. A quoted final answer alone is never cut. A task
that does not fit even with empty tails is dropped (and counted by the builder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from spark_megatron.data.lengths import prompt_token_counts
from spark_megatron.types import Prompt

TRUNCATION_MARK = "[...] "


@dataclass(frozen=True)
class Quoted:
    """What a task quotes of one rollout: the shown text and the rollout's final answer (None if it has none)."""

    text: str
    answer: Optional[str] = None

    @property
    def cuttable(self) -> bool:
        """Only a chain of thought is cut; a quoted final answer is the point of the task."""
        return self.text.strip() != (self.answer or "").strip()


class PromptFitter:
    """Counts rendered task prompts with the policy's tokenizer and chat template (as the engine will)."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, int(max_tokens)

    def count(self, messages: list) -> int:
        return prompt_token_counts(self.tokenizer, [Prompt(uid="fit", messages=messages, ground_truth="")])[0]

    def fit(self, messages_for: Callable[[dict], list], slots: dict) -> Optional[tuple]:
        """-> (slot texts, truncated) that make `messages_for(slot texts)` fit, or None when nothing does.

        `slots`: template slot name -> Quoted."""
        full = {k: q.text for k, q in slots.items()}
        if self.count(messages_for(full)) <= self.max_tokens:
            return full, False
        ids = {k: self.tokenizer(q.text, add_special_tokens=False)["input_ids"]
               for k, q in slots.items() if q.cuttable}
        if not ids:
            return None

        def shown(keep: int) -> dict:
            return {k: self._tail(q, ids[k], keep) if k in ids else q.text for k, q in slots.items()}

        def fits(keep: int) -> bool:
            return self.count(messages_for(shown(keep))) <= self.max_tokens

        if not fits(0):
            return None
        lo, hi = 0, max(len(v) for v in ids.values()) - 1  # lo always fits; every full text is too long
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return shown(lo), True

    def _tail(self, quoted: Quoted, ids: list, keep: int) -> str:
        if keep >= len(ids):
            return quoted.text
        # a tail that starts inside a multi-byte character decodes to replacement characters: drop them
        tail = self.tokenizer.decode(ids[len(ids) - keep:]).lstrip("\ufffd").strip() if keep else ""
        text = TRUNCATION_MARK + tail
        if quoted.answer and quoted.answer not in tail:
            text += f"\n\nFinal answer: {quoted.answer}"
        return text
