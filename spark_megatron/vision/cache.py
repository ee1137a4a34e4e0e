"""Per-step cache of vision-tower outputs: each distinct image is encoded once per step.

The n rollouts of a GRPO group, and recycled tasks carrying the same image, share one image. Keys are
`PreparedImage.key` (content hash + grid), so equal keys mean equal encoder inputs.

Gradient semantics (precise):
- Stored entries are detached. They are used across calls (micro-batches) only when no gradient can flow into
  the tower: grad mode off (rollout log-probs, reference/old-policy passes, reward scoring) or a frozen tower
  (ModelConfig.freeze_vision). Then reuse is exact.
- With a trainable tower and grad mode on, nothing is stored or reused across calls (each micro-batch's backward
  must reach the tower through its own graph); duplicates inside ONE call are still encoded once and the single
  output is indexed several times, so autograd sums their gradients into the one encoder pass - the same
  gradient as encoding each copy separately.
"""
from __future__ import annotations

import torch


class ImageEmbeddingCache:
    """`embeds(vision_model, images)` -> concatenated features of `images` in order; call `new_step()` per step."""

    def __init__(self):
        self._store: dict = {}
        self.images_encoded = 0
        """Images run through the tower since construction (tests and metrics)."""
        self.encoder_calls = 0
        self.hits = 0

    def new_step(self) -> None:
        self._store.clear()

    @staticmethod
    def _trainable(vision_model) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in vision_model.parameters())

    def embeds(self, vision_model, images: list) -> torch.Tensor:
        if not images:
            raise ValueError("embeds() needs at least one image")
        reuse = not self._trainable(vision_model)
        local: dict = {}
        todo = []
        for img in images:
            if img.key in local or (reuse and img.key in self._store):
                self.hits += 1
                local.setdefault(img.key, self._store.get(img.key))
                continue
            local[img.key] = None
            todo.append(img)
        if todo:
            device = next(vision_model.parameters()).device
            pixels = torch.cat([i.pixel_values for i in todo]).to(device)
            grids = torch.tensor([i.grid_thw for i in todo], dtype=torch.long)
            feats = vision_model(pixels, grids).split([i.num_tokens for i in todo])
            self.encoder_calls += 1
            self.images_encoded += len(todo)
            for img, f in zip(todo, feats):
                local[img.key] = f
                if reuse:
                    self._store[img.key] = f.detach()
        return torch.cat([local[i.key] for i in images])

    def embeds_fn(self, images: list):
        """A callable for `Qwen25VLModel.forward(image_embeds_fn=...)`, so the tower runs inside the stage's
        forward (and its graph) only on the first pipeline stage."""
        return lambda vision_model: self.embeds(vision_model, images)
