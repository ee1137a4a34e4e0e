"""Prompt <-> JSON-serialisable dict (checkpointed queues, logged samples)."""
from __future__ import annotations

import copy

from spark_megatron.types import ImageRef, Prompt, TaskKind


def prompt_to_dict(prompt: Prompt) -> dict:
    return {
        "uid": prompt.uid,
        "messages": copy.deepcopy(prompt.messages),
        "ground_truth": prompt.ground_truth,
        "images": [{"path": i.path, "max_pixels": i.max_pixels, "min_pixels": i.min_pixels} for i in prompt.images],
        "kind": TaskKind(prompt.kind).value,
        "origin_uid": prompt.origin_uid,
    }


def prompt_from_dict(data: dict) -> Prompt:
    return Prompt(uid=data["uid"], messages=copy.deepcopy(data["messages"]), ground_truth=data["ground_truth"],
                  images=[ImageRef(**i) for i in data.get("images", [])], kind=TaskKind(data.get("kind", "policy")),
                  origin_uid=data.get("origin_uid"))
