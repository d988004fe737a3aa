"""The sub-sample convolution projection: log-mel frames -> encoder frames at 1/4 the rate.

Two strided 2-D convolutions over (time, frequency), each followed by a cumulative group norm
and a ReLU, then a projection of (frequency x channels) to the encoder width. Time is padded only
after each frame ("reverse causal"), so an output frame reads its own input frames and the next
`kernel - 1`; frequency is padded by `FREQ_PAD` bins on each side.

Example:
    >>> proj = SubSampleConvProjection(AudioConfig())
    >>> x = proj.apply({'params': p}, mel)          # [B, 3000, 128] -> [B, 750, 1536]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.audio.config import FREQ_PAD, AudioConfig
from gemma3n.layers.einsum import weight_init
from gemma3n.layers.projection import Projection
from gemma3n.layers.weights import declare

# Convolution layouts: activations [B, time, freq, channels], kernels as stored (torch's OIHW).
CONV_DIMENSIONS = ('NHWC', 'OIHW', 'NHWC')


class CumulativeGroupNorm(nn.Module):
    """Group norm (one group) whose statistics accumulate over time, so frame t sees only 0..t.

    At frame t the mean is that of every value of frames 0..t; the variance accumulates, over the
    same frames, the squared distance of each frame's values to the mean *at that frame*
    (the checkpoint's definition, not the textbook running variance). No bias; `scale` [C].
    """
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, F, C] -> [B, T, F, C] in x's dtype; statistics in float32."""
        scale = declare(self, 'scale', (x.shape[-1],), ('audio_sscp_channels',),
                        nn.initializers.ones, self.dtype)
        x32 = x.astype(jnp.float32)
        per_frame = x.shape[2] * x.shape[3]
        count = per_frame * jnp.arange(1, x.shape[1] + 1, dtype=jnp.float32)[:, None, None]
        mean = jnp.cumsum(jnp.sum(x32, axis=(2, 3), keepdims=True), axis=1) / count
        squares = jnp.sum(jnp.square(x32 - mean), axis=(2, 3), keepdims=True)
        variance = jnp.cumsum(squares, axis=1) / count
        normed = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)


class StridedConv(nn.Module):
    """2-D convolution without bias, kernel `kernel` [C_out, C_in, kT, kF], VALID over its input."""
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, F, C_in] (already padded) -> [B, T', F', C_out]."""
        kernel = declare(self, 'kernel', (self.out_channels, self.in_channels) + self.kernel_size,
                         ('audio_sscp_channels', 'audio_sscp_in', 'audio_conv_time',
                          'audio_conv_freq'),
                         weight_init(in_axis=(1, 2, 3), out_axis=0), self.dtype)
        return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), self.stride, 'VALID',
                                            dimension_numbers=CONV_DIMENSIONS)


class SubSampleConvBlock(nn.Module):
    """Padding -> strided conv (`conv`) -> cumulative group norm (`norm`) -> ReLU."""
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, F, C_in] -> [B, T', F', C_out] (T' = ceil(T / stride_t) for kernel 3)."""
        kernel_t = self.kernel_size[0]
        x = jnp.pad(x, ((0, 0), (0, kernel_t - 1), (FREQ_PAD, FREQ_PAD), (0, 0)))
        x = StridedConv(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                        self.dtype, name='conv')(x)
        x = CumulativeGroupNorm(self.eps, self.dtype, name='norm')(x)
        return jax.nn.relu(x)


class SubSampleConvProjection(nn.Module):
    """Convolution blocks `conv_0`, `conv_1`, ... then `input_proj_linear/w` [D, F' * C']."""
    config: AudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mel: jax.Array) -> jax.Array:
        """mel: [B, T, input_feat_size] -> [B, config.encoder_frames(T), hidden_size]."""
        cfg = self.config
        x = mel[..., None]                                            # [B, T, F, 1]
        in_channels = 1
        for i, (channels, kernel, stride) in enumerate(
                zip(cfg.sscp_channels, cfg.sscp_kernels, cfg.sscp_strides)):
            x = SubSampleConvBlock(in_channels, channels, tuple(kernel), tuple(stride),
                                   cfg.sscp_group_norm_eps, self.dtype, name=f'conv_{i}')(x)
            in_channels = channels
        # Frequency-major flattening, channels fastest: the projection's input order.
        x = x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],))
        return Projection(cfg.hidden_size, ('audio_embed', 'audio_sscp_features'), self.dtype,
                          name='input_proj_linear')(x)
