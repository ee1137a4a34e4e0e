"""Images for the VL model: loading with clear errors, Qwen2.5-VL preprocessing, the vision placeholder tokens,
per-step encoder-output cache."""
from spark_megatron.vision.cache import ImageEmbeddingCache
from spark_megatron.vision.images import (ImageInputError, ImagePreprocessor, PreparedImage, expand_image_pads,
                                          load_image, smart_resize)
from spark_megatron.vision.tokens import VISION_TOKENS, vision_token_ids

__all__ = ["ImageEmbeddingCache", "ImageInputError", "ImagePreprocessor", "PreparedImage", "VISION_TOKENS",
           "expand_image_pads", "load_image", "smart_resize", "vision_token_ids"]
