"""Antialiased bilinear resizing of uint8 images in fixed-point arithmetic, as torch does it.

The Gemma 3n image processor (transformers' torchvision backend, the default when torchvision is
installed) resizes uint8 images with `torchvision.transforms.v2.functional.resize(...,
antialias=True)`, which runs torch's uint8 kernel: separable passes (width, then height), each
with a triangle filter widened by the downscale factor, float weights rounded to int16 at the
largest precision that keeps them below 2**15, integer accumulation with round-half-up and a
clamp to 0..255 after each pass. Rounding differs from Pillow's (22-bit weights) on some pixels
by one level (1/255 after rescaling), so the arithmetic is reproduced here exactly.

Example:
    >>> resized = resize_uint8(image, 768, 768)     # uint8 [H, W, C] -> uint8 [768, 768, C]
"""

from __future__ import annotations

import math

import numpy as np

# The int16 weights must stay below this bound (torch checks the doubled maximum against it).
INT16_LIMIT = 1 << 15
# Upper bound of the fixed-point precision torch searches.
MAX_PRECISION_BITS = 22
UINT8_MAX = 255


def _triangle(x: np.ndarray) -> np.ndarray:
    """The bilinear (tent) filter: 1 - |x| inside [-1, 1], 0 outside."""
    return np.maximum(1.0 - np.abs(x), 0.0)


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output index: first input index [out], int16 weights [out, K] and their precision.

    Output pixel i is centred at scale * (i + 0.5) in input coordinates; when shrinking, the
    filter's support widens by the scale so every input pixel contributes (antialiasing).
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    window = int(math.ceil(support)) * 2 + 1
    starts = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, window), np.float64)
    for i in range(out_size):
        centre = scale * (i + 0.5)
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), in_size)
        taps = _triangle((np.arange(first, last) - centre + 0.5) * inverse)
        total = taps.sum()
        weights[i, :last - first] = taps / total if total != 0.0 else taps
        starts[i] = first
    w_max = weights.max()
    precision = 0
    while precision < MAX_PRECISION_BITS and int(0.5 + w_max * (1 << (precision + 1))) < INT16_LIMIT:
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    return starts, fixed, precision


def _resize_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass over `axis` of a uint8 array, in torch's fixed-point arithmetic."""
    in_size = image.shape[axis]
    starts, weights, precision = _axis_weights(in_size, out_size)
    moved = np.moveaxis(image, axis, 0).astype(np.int64)
    acc = np.full((out_size, *moved.shape[1:]), 1 << (precision - 1), np.int64)
    broadcast = (slice(None),) + (None,) * (moved.ndim - 1)
    for tap in range(weights.shape[1]):
        index = np.minimum(starts + tap, in_size - 1)   # taps past the window have weight 0
        acc += moved[index] * weights[:, tap][broadcast]
    result = np.clip(acc >> precision, 0, UINT8_MAX).astype(np.uint8)
    return np.moveaxis(result, 0, axis)


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 `[H, W, C]` -> uint8 `[height, width, C]`, antialiased bilinear; an axis whose size
    already matches is not resampled (as in torch)."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"resize_uint8 takes a uint8 [H, W, C] image; got {image.dtype} "
                         f"{tuple(image.shape)}")
    if image.shape[1] != width:
        image = _resize_axis(image, width, axis=1)
    if image.shape[0] != height:
        image = _resize_axis(image, height, axis=0)
    return image
