"""FIFO queue of recycled tasks waiting for a reward-period (or mixed) update; checkpointable as JSON."""
from __future__ import annotations

import collections
from typing import Iterable, Optional

from spark_megatron.data.serialization import prompt_from_dict, prompt_to_dict
from spark_megatron.types import Prompt


class RecycleQueue:
    """First in, first out. Emptied when a new epoch starts (recycled tasks are tied to the epoch's rollouts).

    `max_size` > 0 bounds the queue by dropping the oldest samples; every removal other than `pop` is counted
    (`dropped_overflow`, `discarded_epoch_reset`), so nothing disappears silently.
    """

    def __init__(self, max_size: int = 0):
        self.max_size = max_size
        self._items: collections.deque = collections.deque()
        self.epoch: Optional[int] = None
        self.pushed = 0
        self.popped = 0
        self.dropped_overflow = 0
        self.discarded_epoch_reset = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(self, samples: Iterable[Prompt]) -> int:
        """Append samples; returns how many old samples were dropped to respect `max_size`."""
        for sample in samples:
            self._items.append(sample)
            self.pushed += 1
        return self._trim()

    def _trim(self) -> int:
        """Drop the oldest samples beyond `max_size`; returns (and counts) how many."""
        dropped = 0
        while 0 < self.max_size < len(self._items):
            self._items.popleft()
            dropped += 1
        self.dropped_overflow += dropped
        return dropped

    def pop(self, k: int) -> list:
        """Up to `k` oldest samples."""
        out = [self._items.popleft() for _ in range(min(k, len(self._items)))]
        self.popped += len(out)
        return out

    def pop_batch(self, size: int) -> Optional[list]:
        """Exactly `size` oldest samples, or None (and nothing removed) if fewer are queued."""
        return self.pop(size) if len(self._items) >= size else None

    def peek(self) -> list:
        return list(self._items)

    def reset(self) -> int:
        """Empty the queue; returns the number of samples discarded."""
        n = len(self._items)
        self._items.clear()
        self.discarded_epoch_reset += n
        return n

    def start_epoch(self, epoch: int) -> int:
        """Call with the data epoch before each step; empties the queue when the epoch changes."""
        discarded = 0
        if self.epoch is not None and epoch != self.epoch:
            discarded = self.reset()
        self.epoch = epoch
        return discarded

    def metrics(self, prefix: str = "recycle_queue/") -> dict:
        return {prefix + k: float(v) for k, v in (("size", len(self)), ("pushed", self.pushed),
                                                   ("popped", self.popped), ("dropped_overflow", self.dropped_overflow),
                                                   ("discarded_epoch_reset", self.discarded_epoch_reset))}

    def state_dict(self) -> dict:
        """JSON-serialisable state (queued samples, epoch, counters)."""
        return {"version": 1, "max_size": self.max_size, "epoch": self.epoch,
                "items": [prompt_to_dict(p) for p in self._items],
                "counters": {"pushed": self.pushed, "popped": self.popped,
                             "dropped_overflow": self.dropped_overflow,
                             "discarded_epoch_reset": self.discarded_epoch_reset}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unsupported RecycleQueue state version {state.get('version')!r}")
        # max_size stays as constructed: the current config wins over the checkpointed one.
        self.epoch = state["epoch"]
        self._items = collections.deque(prompt_from_dict(d) for d in state["items"])
        for name, value in state["counters"].items():
            setattr(self, name, value)
        self._trim()
