"""Image preprocessing for the SigLIP vision encoder (SPEC section 6).

Images arrive as uint8 (or float holding the same 0..255 values) `[..., H, W, C]` of any size.
They are resized with antialiased bilinear interpolation to the encoder's resolution and mapped
linearly from [0, 255] to [-1, 1]. `load_image` reads a file into that uint8 layout.

Example:
    >>> image = load_image("cat.png")                    # uint8 [H, W, 3]
    >>> pixels = preprocess_images(image[None])          # float32 [1, 896, 896, 3] in [-1, 1]
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

# Encoder input resolution of Gemma 3n's SigLIP tower (SPEC section 6).
IMAGE_HEIGHT = 896
IMAGE_WIDTH = 896
IMAGE_CHANNELS = 3

# Pixel values span [0, PIXEL_MAX]; the midpoint maps to 0 and the ends to -1 and 1.
PIXEL_MAX = 255.0
PIXEL_MIDPOINT = PIXEL_MAX / 2

# Smallest image layout: a single [H, W, C] image.
MIN_IMAGE_RANK = 3


def check_images(images: jax.Array | np.ndarray, channels: int | None = IMAGE_CHANNELS) -> None:
    """Raises ValueError unless `images` is `[..., H, W, channels]` uint8 or floating point.

    `channels=None` accepts any channel count.
    """
    shape = tuple(images.shape)
    if len(shape) < MIN_IMAGE_RANK:
        raise ValueError(
            f"images must have shape [..., height, width, channels] (rank >= {MIN_IMAGE_RANK}); "
            f"got shape {shape}")
    if channels is not None and shape[-1] != channels:
        raise ValueError(
            f"images must have {channels} channels in the last axis; got shape {shape}")
    if shape[-3] == 0 or shape[-2] == 0:
        raise ValueError(f"images must have a non-empty height and width; got shape {shape}")
    dtype = np.dtype(images.dtype)
    if dtype != np.uint8 and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"images must be uint8 or floating point with values in [0, {PIXEL_MAX:g}]; "
            f"got dtype {dtype}")


def resize_images(
        images: jax.Array | np.ndarray, height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH,
) -> jax.Array:
    """Antialiased bilinear resize of `[..., H, W, C]` to float32 `[..., height, width, C]`.

    Values keep their 0..255 scale. Axes whose size already matches are left untouched, so
    resizing an image that already has the target size returns it exactly.
    """
    check_images(images, channels=None)
    images = jnp.asarray(images, jnp.float32)
    target_shape = (*images.shape[:-3], height, width, images.shape[-1])
    return jax.image.resize(images, target_shape, method="bilinear", antialias=True)


def normalize_images(images: jax.Array) -> jax.Array:
    """Maps pixel values in [0, 255] to float32 [-1, 1], clipping anything outside."""
    scaled = (jnp.asarray(images, jnp.float32) - PIXEL_MIDPOINT) / PIXEL_MIDPOINT
    return jnp.clip(scaled, -1.0, 1.0)


def preprocess_images(
        images: jax.Array | np.ndarray,
        height: int = IMAGE_HEIGHT,
        width: int = IMAGE_WIDTH,
        channels: int = IMAGE_CHANNELS,
) -> jax.Array:
    """Validates, resizes and normalises `[..., H, W, C]` to float32 `[..., height, width, C]`."""
    check_images(images, channels)
    return normalize_images(resize_images(images, height, width))


def load_images(images: Sequence[str | os.PathLike | np.ndarray | jax.Array],
                height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH) -> jax.Array:
    """One prompt's images (file paths or [H, W, C] arrays of any sizes) as float32 [N, H, W, C].

    Each is resized to `height x width` (values stay 0..255) so they stack; the encoder leaves
    an image of its own resolution untouched, so the model sees what it would make of each
    image alone.
    """
    arrays = [load_image(item) if isinstance(item, (str, os.PathLike)) else item
              for item in images]
    return jnp.stack([resize_images(array, height, width) for array in arrays])


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file (any format Pillow reads) as RGB uint8 `[H, W, 3]`.

    Raises FileNotFoundError when the file does not exist and ValueError (naming the file)
    when Pillow cannot decode it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {os.fspath(path)!r}")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image file {os.fspath(path)!r}: {error}") from error
    return np.asarray(rgb, dtype=np.uint8)
