"""Image loading and Qwen2.5-VL preprocessing with errors that name the file.

Sizing follows the qwen-vl-utils rule (both sides multiples of patch * merge = 28, pixel count kept inside
[min_pixels, max_pixels], aspect ratio preserved as closely as the rounding allows); the pixel tensor itself
comes from transformers' Qwen2-VL image processor (PIL backend: no torchvision, no video processor).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)
MAX_ASPECT_RATIO = 200


class ImageInputError(ValueError):
    """An image that cannot be used (missing, unreadable, empty, absurd aspect ratio, placeholder mismatch)."""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280, source: str = "image") -> tuple:
    """Target (height, width): multiples of `factor` whose product lies in [min_pixels, max_pixels]."""
    if height <= 0 or width <= 0:
        raise ImageInputError(f"{source}: zero-size image ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageInputError(f"{source}: aspect ratio {max(height, width) / min(height, width):.0f} exceeds "
                              f"{MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:  # shrink by the area ratio, rounding down so the bound holds
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def load_image(image) -> "PIL.Image.Image":  # noqa: F821
    """An image file (a path or an `ImageRef`) as an RGB PIL image; ImageInputError naming the file for anything
    unusable. An already loaded PIL image passes through."""
    from PIL import Image, UnidentifiedImageError

    path = getattr(image, "path", image)  # ImageRef
    if not isinstance(path, (str, Path)):
        return image
    p = Path(path)
    if not p.is_file():
        raise ImageInputError(f"{p}: image file not found")
    if p.stat().st_size == 0:
        raise ImageInputError(f"{p}: image file is empty (0 bytes)")
    try:
        with Image.open(p) as im:
            im.load()
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageInputError(f"{p}: unreadable image ({type(e).__name__}: {e})") from None
    if img.width == 0 or img.height == 0:
        raise ImageInputError(f"{p}: zero-size image ({img.width}x{img.height})")
    return img


@dataclass
class PreparedImage:
    """One preprocessed image, ready for the vision tower."""

    key: str
    """Content hash + grid: equal keys mean equal encoder inputs (the image-embedding cache key)."""
    source: str
    pixel_values: torch.Tensor
    """[t*h*w patches, C * temporal_patch * patch * patch] in the processor's merge-block order."""
    grid_thw: tuple
    """(t, h, w) in patches."""
    merge_size: int = 2

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size ** 2


class ImagePreprocessor:
    """Qwen2.5-VL image preprocessing configured from a checkpoint's preprocessor_config.json."""

    def __init__(self, hf_dir=None, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None):
        from transformers import Qwen2VLImageProcessorPil

        self.processor = (Qwen2VLImageProcessorPil.from_pretrained(str(hf_dir)) if hf_dir is not None
                          else Qwen2VLImageProcessorPil())
        size = self.processor.size
        self.min_pixels = min_pixels or size.get("shortest_edge", 56 * 56)
        self.max_pixels = max_pixels or size.get("longest_edge", 28 * 28 * 1280)
        self.merge = self.processor.merge_size
        self.factor = self.processor.patch_size * self.merge

    def prepare(self, image, source: Optional[str] = None, min_pixels: Optional[int] = None,
                max_pixels: Optional[int] = None) -> PreparedImage:
        """`image`: a path, or a PIL image (then `source` names it in errors and logs)."""
        if isinstance(image, (str, Path)):
            source = source or str(image)
            digest = hashlib.sha1(Path(image).read_bytes() if Path(image).is_file() else b"").hexdigest()
            image = load_image(image)
        else:
            source = source or "<in-memory image>"
            if image.width == 0 or image.height == 0:
                raise ImageInputError(f"{source}: zero-size image ({image.width}x{image.height})")
            image = image.convert("RGB")
            digest = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
        lo, hi = min_pixels or self.min_pixels, max_pixels or self.max_pixels
        th, tw = smart_resize(image.height, image.width, self.factor, lo, hi, source)
        if image.height * image.width > hi:
            log.info("%s: %dx%d exceeds max_pixels=%d; resized to %dx%d", source, image.width, image.height, hi,
                     tw, th)
        out = self.processor(images=[image], size={"shortest_edge": lo, "longest_edge": hi}, return_tensors="pt")
        grid = tuple(int(x) for x in out["image_grid_thw"][0].tolist())
        p = self.processor.patch_size
        if (grid[1] * p, grid[2] * p) != (th, tw):
            raise ImageInputError(f"{source}: processor resized to {grid[1] * p}x{grid[2] * p}, sizing rule says "
                                  f"{th}x{tw}")
        return PreparedImage(key=f"{digest}:{grid}", source=source, pixel_values=out["pixel_values"],
                             grid_thw=grid, merge_size=self.merge)


def expand_image_pads(token_ids: list, images: list, image_token_id: int, record: str = "prompt") -> list:
    """Expand each single <|image_pad|> the chat template emits into the image's token count.

    Raises ImageInputError naming `record` when the placeholder count and the image count differ.
    """
    n_pads = sum(1 for t in token_ids if t == image_token_id)
    if n_pads != len(images):
        raise ImageInputError(f"{record}: {n_pads} image placeholders but {len(images)} images")
    out, it = [], iter(images)
    for t in token_ids:
        out.extend([t] * next(it).num_tokens if t == image_token_id else [t])
    return out
