"""Images for the VL model: loading with clear errors, Qwen2.5-VL preprocessing, per-step encoder-output cache."""
from spark_megatron.vision.cache import ImageEmbeddingCache
from spark_megatron.vision.images import (ImageInputError, ImagePreprocessor, PreparedImage, expand_image_pads,
                                          load_image, smart_resize)

__all__ = ["ImageEmbeddingCache", "ImageInputError", "ImagePreprocessor", "PreparedImage", "expand_image_pads",
           "load_image", "smart_resize"]
