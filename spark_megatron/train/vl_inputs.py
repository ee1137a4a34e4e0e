"""Images through the actor: per-sequence mRoPE position ids and vision-tower inputs for VL micro-batches.

Where images flow. A SequenceSample carries its prepared images (`images`, placeholder order). After the actor
cuts a batch into padded micro-batches, `VLInputs.attach` gives each micro-batch
- 3-D (temporal, height, width) position ids [3, b, s], computed per sequence by the model's own
  `mrope_position_ids` (every pipeline stage applies rotary embeddings, so every stage needs them; a VL model
  needs them for text-only rows too), and
- on the FIRST pipeline stage only (the vision tower lives there), the images of its rows in row order -- the
  order in which `Qwen25VLModel.embed` scatters features into the batch-major <|image_pad|> positions.

How the image cache meets gradients. The vision inputs are a callable on an `ImageEmbeddingCache`, run inside
the stage's forward. The cache reuses stored (detached) features across micro-batches only while no gradient
can reach the tower: grad mode off (logprob passes) or a frozen tower (`model.freeze_vision`). With a trainable
tower in a training forward it stores nothing and reuses nothing across micro-batches; it only encodes an image
that repeats inside ONE micro-batch once and indexes that output several times, so autograd sums the copies'
gradients into the one encoder pass (the same gradient as encoding each copy). `ImageCacheScope` bounds how long
stored features live (see there).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import torch

from spark_megatron.train.batching import BatchError


class VLInputs:
    """mRoPE ids + vision inputs for micro-batches of one VL pipeline stage; `for_stage` gives None for text."""

    def __init__(self, image_token_id: int, merge: int, first_stage: bool):
        self.image_token_id, self.merge, self.first_stage = int(image_token_id), int(merge), bool(first_stage)

    @classmethod
    def for_stage(cls, stage, shape) -> Optional["VLInputs"]:
        if not hasattr(shape, "image_token_id"):
            return None
        return cls(shape.image_token_id, shape.vision.spatial_merge_size, getattr(stage, "pre_process", True))

    # ------------------------------------------------------------------------------------------ checks
    def check(self, seqs: Sequence) -> None:
        """Every rank checks the whole batch up front: a bad sequence must fail on every rank alike, not only
        on the data-parallel rank that owns it (the others would hang in the next collective)."""
        for i, s in enumerate(seqs):
            images = list(s.images or [])
            tokens = [int(t) for t in s.tokens]
            runs = _pad_runs(tokens, self.image_token_id)
            if runs and sum(runs[-1]) > s.prompt_len:
                raise BatchError(f"sequence {i}: <|image_pad|> at position {sum(runs[-1]) - 1}, inside the "
                                 f"response (prompt_len {s.prompt_len}); image tokens must be in the prompt")
            if len(runs) != len(images):
                raise BatchError(f"sequence {i}: {len(runs)} <|image_pad|> runs but {len(images)} images")
            for j, ((start, n), img) in enumerate(zip(runs, images)):
                if n != img.num_tokens:
                    raise BatchError(f"sequence {i}: image {j} ({getattr(img, 'source', '?')}, grid "
                                     f"{tuple(img.grid_thw)}) needs {img.num_tokens} <|image_pad|> tokens, the "
                                     f"run at position {start} has {n}")

    # ------------------------------------------------------------------------------------------ collation
    def positions(self, tokens: Sequence[int], images: list, seq_len: int) -> torch.Tensor:
        """[3, seq_len] mRoPE ids of one sequence; the padding tail continues as text (never attended to by
        the real tokens: attention is causal)."""
        from spark_megatron.models.qwen2_5_vl import mrope_position_ids

        ids = torch.as_tensor(tokens, dtype=torch.long).flatten()[None]
        grids = torch.tensor([tuple(im.grid_thw) for im in images], dtype=torch.long) if images else None
        pos = mrope_position_ids(ids, grids, self.image_token_id, self.merge)[:, 0]
        n = pos.shape[1]
        if seq_len > n:
            tail = pos.max() + 1 + torch.arange(seq_len - n, dtype=torch.long)
            pos = torch.cat([pos, tail.expand(3, -1)], dim=1)
        return pos

    def attach(self, microbatches: list, seqs: Sequence, cache=None) -> None:
        """Set mRoPE position ids and (first stage) vision inputs on each micro-batch, in place."""
        for mb in microbatches:
            b, s = mb.tokens.shape
            pos = torch.zeros(3, b, s, dtype=torch.long)
            images = []
            for r, idx in enumerate(mb.rows):
                imgs = list(seqs[idx].images or []) if idx >= 0 else []
                # filler rows (idx < 0) hold pad tokens only: plain text positions
                tokens = seqs[idx].tokens if idx >= 0 else [0]
                pos[:, r] = self.positions(tokens, imgs, s)
                images.extend(imgs)
            mb.position_ids = pos.to(mb.tokens.device)
            if self.first_stage and images:
                mb.model_inputs = vision_inputs(images, cache, mb.tokens.device)


def vision_inputs(images: list, cache, device) -> dict:
    """Forward kwargs of `Qwen25VLModel` for `images` (row order): a cache callable, or raw pixels."""
    if cache is not None:
        return {"image_embeds_fn": cache.embeds_fn(images)}
    return {"pixel_values": torch.cat([im.pixel_values for im in images]).to(device),
            "image_grid_thw": torch.tensor([tuple(im.grid_thw) for im in images], dtype=torch.long)}


def _pad_runs(tokens: list, pad_id: int) -> list:
    """[(start, length)] of the maximal runs of `pad_id`."""
    runs, i, n = [], 0, len(tokens)
    while i < n:
        if tokens[i] != pad_id:
            i += 1
            continue
        j = i
        while j < n and tokens[j] == pad_id:
            j += 1
        runs.append((i, j - i))
        i = j
    return runs


def check_text_only(seqs: Sequence) -> None:
    for i, s in enumerate(seqs):
        if s.images:
            raise BatchError(f"sequence {i}: carries {len(s.images)} images but the model is text-only")


def freeze_vision(stage, frozen: bool) -> bool:
    """Honour `model.freeze_vision` before DDP / optimizer are built: parameters with requires_grad False get no
    DDP grad buffer and no optimizer state (megatron skips them), so they stay bit-identical. Returns whether
    the stage's vision tower (if any) is frozen; a text model ignores the flag."""
    if frozen and hasattr(stage, "freeze_vision"):
        stage.freeze_vision(True)
    tower = getattr(stage, "vision_model", None)
    return tower is not None and not any(p.requires_grad for p in tower.parameters())


def check_overlap(vl: Optional[VLInputs], freeze_vision: bool, overlap_grad_reduce: bool) -> None:
    """Refuse overlapped grad reduce with a trainable tower: megatron's overlap learns in the first step which
    parameters produce gradients and asserts when a later step differs, and a step whose last micro-batch has
    no image (text-only tasks, a data-parallel rank's filler micro-batch) leaves the tower without gradients."""
    if vl is not None and overlap_grad_reduce and not freeze_vision:
        raise ValueError("overlap_grad_reduce with a trainable vision tower is not supported (steps without "
                         "images leave the tower's grad buckets unreduced); set model.freeze_vision=true or "
                         "disable overlap_grad_reduce")


class ImageCacheScope:
    """Lifetime of the stored image features of one model.

    Stored features are valid only for the weights they were computed with and hold memory, so they live for
    one public call (a forward-only pass over a batch, or a whole `train_step` with its old-logprob pass and
    optimizer steps) and are dropped when it returns; `weights_changed()` drops them after an optimizer step
    that moved a trainable tower. Nested calls (train_step -> compute_logprobs / optimizer_step) share the
    outer call's entries.
    """

    def __init__(self, cache):
        self.cache = cache
        self._depth = 0

    @contextlib.contextmanager
    def __call__(self):
        outer = self._depth == 0
        if outer and self.cache is not None:
            self.cache.new_step()  # nothing from an earlier call survives a checkpoint load or a weight push
        self._depth += 1
        try:
            yield self.cache
        finally:
            self._depth -= 1
            if outer and self.cache is not None:
                self.cache.new_step()

    def weights_changed(self) -> None:
        if self.cache is not None:
            self.cache.new_step()


def image_scoped(method):
    """Run a runner method inside its `_image_scope` (the cache lifetime above)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._image_scope():
            return method(self, *args, **kwargs)

    return wrapper
