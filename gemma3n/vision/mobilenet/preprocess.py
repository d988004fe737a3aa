"""Image preprocessing for the MobileNet-V5 tower, as Gemma 3n's `transformers` processor does it.

The released checkpoint's image processor (`preprocessor_config.json`: SigLIP processor,
`size` 768 x 768, `resample` bilinear, `do_rescale` with 1/255, `do_normalize` false, RGB
conversion) maps each image to float32 `[768, 768, 3]` in [0, 1]:

1. RGB: transparency composited onto white, greyscale repeated (transformers' `convert_to_rgb`);
2. resize of the uint8 image to 768 x 768, ignoring the aspect ratio, with antialiased bilinear
   filtering in torch's fixed-point arithmetic (`resize.resize_uint8`; the result is uint8);
3. multiplication by float32(1/255).

Example:
    >>> pixels = preprocess_images(["cat.jpg", dog_array])      # float32 [2, 768, 768, 3]
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from gemma3n.vision.mobilenet.resize import resize_uint8

IMAGE_SIZE = 768
RESCALE_FACTOR = np.float32(1 / 255)
WHITE = (255, 255, 255, 255)
# uint8 arrays accepted: [H, W] greyscale or [H, W, C] with these channel counts.
ARRAY_CHANNELS = (1, 3, 4)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}

ImageLike = str | os.PathLike | Image.Image | np.ndarray


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 `[H, W, 3]`: images with transparency are composited onto white first."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
                          .convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _as_pil(image: ImageLike, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image file not found: {os.fspath(image)!r}")
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened.copy()
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image file {os.fspath(image)!r}: {error}") from error
    array = np.asarray(image)
    channels = 1 if array.ndim == 2 else (array.shape[-1] if array.ndim == 3 else None)
    if array.dtype != np.uint8 or channels not in ARRAY_CHANNELS or 0 in array.shape:
        raise ValueError(f"{where} must be a file path, a PIL image or a non-empty uint8 array "
                         f"[H, W] or [H, W, C] with C in {ARRAY_CHANNELS}; got {array.dtype} "
                         f"{tuple(array.shape)}")
    return Image.fromarray(array.reshape(array.shape[:2]) if channels == 1 else array,
                           _MODES[channels])


def resize_image(image: ImageLike, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image (path, PIL image or uint8 array) -> RGB uint8 `[size, size, 3]` (steps 1-2),
    what the model takes as `images` (it rescales them itself)."""
    return resize_uint8(to_rgb(_as_pil(image, "image")), size, size)


def preprocess_image(image: ImageLike, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image (path, PIL image or uint8 array) -> float32 `[size, size, 3]` in [0, 1]."""
    return resize_image(image, size).astype(np.float32) * RESCALE_FACTOR


def preprocess_images(images: Sequence[ImageLike], size: int = IMAGE_SIZE) -> np.ndarray:
    """Images of any sizes -> float32 `[N, size, size, 3]`, the encoder's input."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        raise ValueError("preprocess_images takes a sequence of images; wrap a single image "
                         "in a list")
    if not images:
        raise ValueError("preprocess_images got no images")
    return np.stack([preprocess_image(image, size) for image in images])
