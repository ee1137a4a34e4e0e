"""Epoch-wise, seeded batches of prompts with a resumable position."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass
class PromptBatch:
    epoch: int
    step_in_epoch: int
    prompts: list


class PromptStream:
    """Yields batches of `batch_size` prompts; reshuffles each epoch with Random((seed, epoch)).

    The order of an epoch depends only on (seed, epoch), so `state_dict` needs just the position.
    A last partial batch is kept unless `drop_last`. `epochs=None` cycles forever.
    """

    def __init__(self, prompts: Sequence, batch_size: int, shuffle: bool = True, seed: int = 0,
                 epochs: Optional[int] = None, drop_last: bool = False):
        if batch_size < 1 or not prompts:
            raise ValueError("PromptStream needs prompts and batch_size >= 1")
        self.prompts, self.batch_size, self.shuffle = list(prompts), batch_size, shuffle
        self.seed, self.epochs, self.drop_last = seed, epochs, drop_last
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def _epoch_done(self) -> bool:
        left = len(self._order) - self.position
        return left <= 0 or (self.drop_last and left < self.batch_size)

    def next_batch(self) -> Optional[PromptBatch]:
        """The next batch, or None when all epochs are done."""
        if self._epoch_done():
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                return None
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
            if self._epoch_done():  # drop_last with fewer prompts than a batch
                return None
        idx = self._order[self.position:self.position + self.batch_size]
        batch = PromptBatch(self.epoch, self.position // self.batch_size, [self.prompts[i] for i in idx])
        self.position += len(idx)
        return batch

    def __iter__(self):
        while (batch := self.next_batch()) is not None:
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != len(self.prompts) or state["seed"] != self.seed:
            raise ValueError("PromptStream state is from a different dataset or seed")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)
