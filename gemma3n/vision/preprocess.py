"""Image preprocessing for the SigLIP vision encoder (docs/architecture.md §5).

Images arrive as uint8 (or float holding the same 0..255 values) `[..., H, W, C]` of any size.
They are resized with antialiased bilinear interpolation to the encoder's resolution and mapped
linearly from [0, 255] to [-1, 1]. `load_image` reads a file into that uint8 layout.

A file is checked from its header (Pillow reads only that when opening) before any pixel is
decoded: a directory, a file Pillow cannot identify, or an image of more than MAX_IMAGE_PIXELS
pixels (a small compressed file may declare billions: a decompression bomb) is refused with an
error naming the file.

Example:
    >>> image = load_image("cat.png")                    # uint8 [H, W, 3]
    >>> pixels = preprocess_images(image[None])          # float32 [1, 896, 896, 3] in [-1, 1]
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

# Encoder input resolution of Gemma 3n's SigLIP tower (docs/architecture.md §5).
IMAGE_HEIGHT = 896
IMAGE_WIDTH = 896
IMAGE_CHANNELS = 3

# Pixel values span [0, PIXEL_MAX]; the midpoint maps to 0 and the ends to -1 and 1.
PIXEL_MAX = 255.0
PIXEL_MIDPOINT = PIXEL_MAX / 2

# Smallest image layout: a single [H, W, C] image.
MIN_IMAGE_RANK = 3

# The encoder sees IMAGE_HEIGHT x IMAGE_WIDTH; more pixels only cost memory while an image is
# decoded and resized (about 15 bytes each). 50 million takes a 48-megapixel photo (8000 x 6000).
MAX_IMAGE_PIXELS = 50_000_000
# What Pillow's decoders raise for a file they accept by its header but cannot decode.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error)
_PILLOW_PIXEL_COUNT = r"\((\d+) pixels\)"     # in Pillow's DecompressionBombError message


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


def load_images(images: str | os.PathLike | Sequence[str | os.PathLike | np.ndarray | jax.Array],
                height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH) -> jax.Array:
    """One prompt's images (file paths or [H, W, C] arrays of any sizes) as float32 [N, H, W, C].

    Each is resized to `height x width` (values stay 0..255) so they stack; the encoder leaves
    an image of its own resolution untouched, so the model sees what it would make of each
    image alone. Every file's header is checked (`image_file_size`) before any is decoded.
    """
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    files = [item for item in images if isinstance(item, (str, os.PathLike))]
    for path in files:
        image_file_size(path)
    arrays = [load_image(item) if isinstance(item, (str, os.PathLike)) else item
              for item in images]
    return jnp.stack([resize_images(array, height, width) for array in arrays])


@contextlib.contextmanager
def _open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """The image file at `path` opened (header read, no pixel decoded) after the checks of
    `image_file_size`."""
    name = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"image {name!r} is a directory, not an image file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {name!r}")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit, which is higher than ours (checked below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        # Over Pillow's own limit (above ours), Pillow refuses to open it; its message holds
        # the pixel count.
        count = re.search(_PILLOW_PIXEL_COUNT, str(error))
        size = f"{int(count.group(1)):,} pixels" if count else "too many pixels"
        raise _too_large(path, size) from None
    except DECODE_ERRORS as error:
        raise ValueError(f"cannot read image file {name!r}: {error}") from error
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise _too_large(path, f"{width}x{height} = {width * height:,} pixels")
        yield image


def _too_large(path: str | os.PathLike, size: str) -> ValueError:
    return ValueError(
        f"image file {os.fspath(path)!r} ({os.path.getsize(path):,} bytes) declares {size}, "
        f"more than the limit of {MAX_IMAGE_PIXELS:,}: shrink it first")


def image_file_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, from its header alone.

    Raises IsADirectoryError / FileNotFoundError, or ValueError naming the file when Pillow
    cannot identify it or it has more than MAX_IMAGE_PIXELS pixels.
    """
    with _open_image(path) as image:
        return image.size


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file (any format Pillow reads) as RGB uint8 `[H, W, 3]`.

    The header is checked first (`image_file_size`); a file that then fails to decode raises
    ValueError naming it.
    """
    with _open_image(path) as image:
        try:
            rgb = image.convert("RGB")
        except DECODE_ERRORS as error:
            raise ValueError(f"cannot read image file {os.fspath(path)!r}: {error}") from error
    return np.asarray(rgb, dtype=np.uint8)
