"""The multi-scale fusion adapter (MSFA): MobileNet-V5's head that turns stage outputs into tokens.

The chosen stage outputs are brought to the resolution of the first (nearest-neighbour
upsampling), concatenated over channels, mixed by a 1 x 1 inverted bottleneck to `hidden_size`,
reduced to the token grid (average pooling when the grid divides the resolution, bilinear
interpolation otherwise) and RMS-normalised (timm `MobileNetV5MultiScaleFusionAdapter`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.vision.mobilenet import config as mnv5
from gemma3n.vision.mobilenet.blocks import InvertedBottleneckBlock
from gemma3n.vision.mobilenet.layers import channel_norm


def upsample_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
    """`[B, h, w, C]` -> `[B, height, width, C]`: output pixel i reads input floor(i * h / height)."""
    rows = np.arange(height) * x.shape[1] // height
    cols = np.arange(width) * x.shape[2] // width
    return x[:, rows][:, :, cols]


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of half-pixel bilinear interpolation without antialiasing (torch's
    `interpolate(mode='bilinear', align_corners=False)`): sample at (i + 0.5) * in / out - 0.5,
    clamped to the first pixel."""
    source = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lower = np.floor(source).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = source - lower
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), lower), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), upper), frac)
    return matrix


def reduce_to_grid(x: jax.Array, size: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, size, size, C]`: average pools of H / size when that divides both
    sides, else bilinear interpolation."""
    batch, height, width, channels = x.shape
    if (height, width) == (size, size):
        return x
    if height % size == 0 and width % size == 0:
        pool_h, pool_w = height // size, width // size
        return x.reshape(batch, size, pool_h, size, pool_w, channels).mean(axis=(2, 4))
    rows = jnp.asarray(_bilinear_matrix(height, size), x.dtype)
    cols = jnp.asarray(_bilinear_matrix(width, size), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols)


class MultiScaleFusionAdapter(nn.Module):
    """Fuses stage outputs into a `[B, resolution, resolution, hidden_size]` token grid.

    Params: `ffn/...` (an `InvertedBottleneckBlock` with no depthwise convs, no layer scale, no
    residual: `pw_exp` to make_divisible(sum(C_i) * expansion), `pw_proj` to hidden_size) and
    `norm/scale` [hidden_size].
    """
    hidden_size: int
    resolution: int
    expansion: float = 2.0

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        """features: `[B, H_i, W_i, C_i]`, the first at the highest resolution ->
        `[B, resolution, resolution, hidden_size]`."""
        height, width = features[0].shape[1:3]
        resized = [f if f.shape[1] >= height and f.shape[2] >= width
                   else upsample_nearest(f, height, width) for f in features]
        x = jnp.concatenate(resized, axis=-1)
        ffn = mnv5.InvertedBottleneck(self.hidden_size, expansion=self.expansion)
        x = InvertedBottleneckBlock(ffn, layer_scale=False, residual=False, name="ffn")(x)
        return channel_norm("norm")(reduce_to_grid(x, self.resolution))
