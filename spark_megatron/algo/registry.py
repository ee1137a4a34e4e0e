"""Name -> function registries, so recipes pick estimators and aggregations by string."""
from __future__ import annotations

import difflib
from typing import Callable, Dict


class Registry:
    """A named table of functions; unknown names fail with the closest known one suggested."""

    def __init__(self, what: str):
        self.what = what
        self._table: Dict[str, Callable] = {}

    def register(self, *names: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            for name in names:
                if name in self._table:
                    raise KeyError(f"{self.what} '{name}' is already registered")
                self._table[name] = fn
            return fn
        return add

    def get(self, name: str) -> Callable:
        if name not in self._table:
            close = difflib.get_close_matches(name, list(self._table), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise KeyError(f"unknown {self.what} '{name}' (known: {', '.join(sorted(self._table))}){hint}")
        return self._table[name]

    def names(self) -> list:
        return sorted(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table
