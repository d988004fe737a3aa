"""SigLIP vision encoder of Gemma 3n and its image preprocessing (docs/architecture.md §5).

Example:
    >>> from gemma3n.vision import SigLiPFromPatches, load_image
    >>> images = load_image("cat.png")[None, None]          # uint8 [1, 1, H, W, 3]
    >>> model = SigLiPFromPatches()
    >>> params = model.init(jax.random.key(0), images)['params']
    >>> soft_tokens = model.apply({'params': params}, images)  # float32 [1, 1, 256, 1152]
"""

from gemma3n.vision.preprocess import (
    IMAGE_CHANNELS,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    check_images,
    load_image,
    normalize_images,
    preprocess_images,
    resize_images,
)
from gemma3n.vision.siglip import SigLiPFromPatches, ViTModel, VisionExit

__all__ = [
    "IMAGE_CHANNELS",
    "IMAGE_HEIGHT",
    "IMAGE_WIDTH",
    "SigLiPFromPatches",
    "ViTModel",
    "VisionExit",
    "check_images",
    "load_image",
    "normalize_images",
    "preprocess_images",
    "resize_images",
]
