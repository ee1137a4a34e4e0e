"""`synthetic:shapes`: a seeded, verifiable toy VL task (count the squares in an image) for CPU runs of tiny
Qwen2.5-VL models.

Spec: `synthetic:shapes[?n=64&max=4&size=56&seed=0]`: n RGB images of `size` x `size` pixels, each with 1..max
non-overlapping coloured squares on white, and the question "How many squares ...?" answered in \\boxed{}. The PNGs
are written once per spec under $SPARK_SYNTHETIC_DIR (default: <tmp>/spark_synthetic/<spec hash>/), each by an
atomic rename, so ranks that load the same spec at once all see complete files.
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from spark_megatron.data.records import DataError
from spark_megatron.data.synthetic import parse_query
from spark_megatron.types import ImageRef, Prompt

PREFIX = "synthetic:shapes"
_QUESTION = "How many squares are in the image? Put the final answer in \\boxed{}."
_COLOURS = ((220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 170, 20))


@dataclass(frozen=True)
class ShapesSpec:
    n: int = 64
    """Number of prompts (one image each)."""
    max: int = 4
    """Squares per image are drawn from 1..max."""
    size: int = 56
    """Image side in pixels."""
    seed: int = 0


def parse_spec(spec: str) -> ShapesSpec:
    parsed = ShapesSpec(**parse_query(spec, PREFIX, ShapesSpec))
    if parsed.n < 1 or not 1 <= parsed.max <= 9 or parsed.size < 28:
        raise DataError(f"{spec}: need n >= 1, 1 <= max <= 9 and size >= 28")
    return parsed


def _draw(cells: list, size: int):
    """A white image with a square in each of `cells` of a 3x3 grid (never overlapping)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell = size // 3
    for k, c in enumerate(cells):
        x, y = (c % 3) * cell, (c // 3) * cell
        side = max(4, cell * 2 // 3)
        draw.rectangle([x + 2, y + 2, x + 2 + side, y + 2 + side], fill=_COLOURS[k % len(_COLOURS)])
    return img


def _image_dir(spec: str) -> Path:
    root = Path(os.environ.get("SPARK_SYNTHETIC_DIR") or Path(tempfile.gettempdir()) / "spark_synthetic")
    return root / hashlib.sha1(spec.encode()).hexdigest()[:16]


def shapes_prompts(spec: str = PREFIX) -> list:
    """The prompts of a shapes spec, images written on first use; identical for identical specs."""
    cfg = parse_spec(spec)
    rng = random.Random(cfg.seed)
    out_dir = _image_dir(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = []
    for i in range(cfg.n):
        count = rng.randint(1, cfg.max)
        cells = rng.sample(range(9), count)  # drawn from the RNG even when the file exists: same stream
        path = out_dir / f"{i:05d}.png"
        if not path.is_file():
            fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".png.tmp")
            with os.fdopen(fd, "wb") as f:
                _draw(cells, cfg.size).save(f, format="PNG")
            os.replace(tmp, path)
        content = [{"type": "image", "image": str(path)}, {"type": "text", "text": _QUESTION}]
        prompts.append(Prompt(uid=f"{PREFIX}:{i}", messages=[{"role": "user", "content": content}],
                              ground_truth=str(count), images=[ImageRef(str(path))]))
    return prompts
