"""Image loading / sizing / placeholder expansion: clear errors naming the file, logged resizes."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from spark_megatron.vision import ImageInputError, ImagePreprocessor, expand_image_pads, load_image, smart_resize

pytestmark = pytest.mark.unit


def _png(path, h, w, seed=0):
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_smart_resize_matches_transformers_rule():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_rule

    rng = np.random.default_rng(1)
    for h, w in rng.integers(20, 3000, (300, 2)).tolist():
        for lo, hi in [(56 * 56, 28 * 28 * 1280), (28 * 28, 28 * 28 * 64), (200 * 200, 400 * 400)]:
            assert smart_resize(h, w, 28, lo, hi) == tuple(hf_rule(h, w, 28, lo, hi)), (h, w, lo, hi)
            th, tw = smart_resize(h, w, 28, lo, hi)
            assert th % 28 == 0 and tw % 28 == 0
            assert th * tw <= hi or min(th, tw) == 28  # a side clamped at one factor can overshoot (both rules)


@pytest.mark.parametrize("content,msg", [(None, "not found"), (b"", "empty"), (b"\x89PNG garbage", "unreadable")])
def test_bad_files_name_the_file(tmp_path, content, msg):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageInputError, match=f"bad.png.*{msg}"):
        load_image(path)
    with pytest.raises(ImageInputError, match="bad.png"):
        ImagePreprocessor(min_pixels=28 * 28, max_pixels=28 * 28 * 64).prepare(path)


def test_zero_size_and_extreme_aspect(tmp_path):
    from PIL import Image

    pre = ImagePreprocessor(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
    with pytest.raises(ImageInputError, match="thumb.*zero-size"):
        pre.prepare(Image.new("RGB", (0, 5)), source="thumb")
    with pytest.raises(ImageInputError, match="strip.png.*aspect ratio"):
        pre.prepare(_png(tmp_path / "strip.png", 2, 600))


def test_oversized_image_is_resized_and_logged(tmp_path, caplog):
    pre = ImagePreprocessor(min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    path = _png(tmp_path / "big.png", 300, 400)
    with caplog.at_level(logging.INFO, logger="spark_megatron.vision.images"):
        img = pre.prepare(path)
    assert "big.png" in caplog.text and "max_pixels" in caplog.text
    t, h, w = img.grid_thw
    assert (h * 14) * (w * 14) <= 28 * 28 * 16 and img.pixel_values.shape[0] == t * h * w
    assert img.num_tokens == t * h * w // 4
    # same bytes -> same cache key; other bytes -> other key
    assert pre.prepare(path).key == img.key != pre.prepare(_png(tmp_path / "o.png", 300, 400, seed=2)).key


def test_placeholder_count_mismatch_names_the_record(tmp_path):
    pre = ImagePreprocessor(min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    img = pre.prepare(_png(tmp_path / "a.png", 60, 90))
    out = expand_image_pads([1, 7, 2], [img], image_token_id=7)
    assert out == [1] + [7] * img.num_tokens + [2]
    with pytest.raises(ImageInputError, match="task-17: 2 image placeholders but 1 images"):
        expand_image_pads([7, 7], [img], 7, record="task-17")
