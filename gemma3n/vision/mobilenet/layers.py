"""Convolution, normalisation and layer-scale building blocks of MobileNet-V5, channels last.

Activations are `[B, H, W, C]`. Convolution kernels are `[kh, kw, C_in / groups, C_out]`
(logical axes: kernel height, kernel width, conv input, conv output); depthwise convolutions
have one input channel per group. Norm scales, biases and layer scales are `[C]` (channels).
Padding is TensorFlow's 'SAME' (timm `pad_type='same'`): output size ceil(input / stride), the
odd pixel of padding after the image, never before.

Submodule names follow timm's (`conv`, `bn`, `gamma`...) so the checkpoint mapping is a rename.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.layers.norm import RMSNorm
from gemma3n.vision.mobilenet.config import LAYER_SCALE_INIT

CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def gelu(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation, MobileNet-V5's only activation."""
    return jax.nn.gelu(x, approximate=True)


class Conv2d(nn.Module):
    """2-D convolution with 'SAME' padding; `depthwise` convolves each channel on its own.

    Params: `kernel` [k, k, C_in (1 if depthwise), features], `bias` [features] if `use_bias`.

    Example:
        >>> conv = Conv2d(features=32, kernel_size=3, stride=2)
        >>> y = conv.apply(params, x)        # [B, 64, 64, 3] -> [B, 32, 32, 32]
    """
    features: int
    kernel_size: int = 1
    stride: int = 1
    depthwise: bool = False
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C_in]` -> `[B, ceil(H / stride), ceil(W / stride), features]`."""
        in_channels = x.shape[-1]
        if self.depthwise and self.features != in_channels:
            raise ValueError(f"a depthwise conv keeps its {in_channels} channels; asked for "
                             f"{self.features}")
        k = self.kernel_size
        kernel_in = 1 if self.depthwise else in_channels
        kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                            (k, k, kernel_in, self.features), jnp.float32)
        kernel = kernel.astype(x.dtype)
        if k == 1 and self.stride == 1 and not self.depthwise:
            # A pointwise conv is a matmul over channels; einsum avoids the conv machinery.
            y = jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(self.stride, self.stride), padding="SAME",
                dimension_numbers=CONV_DIMENSIONS,
                feature_group_count=in_channels if self.depthwise else 1)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,),
                               jnp.float32).astype(x.dtype)
        return y


def channel_norm(name: str) -> RMSNorm:
    """RMS norm over the channel axis with a learned `scale` (timm `RmsNorm2d`, eps 1e-6)."""
    return RMSNorm(name=name)


class ConvNorm(nn.Module):
    """`conv` then RMS norm `bn`, then GELU when `activation` (timm `ConvNormAct`).

    Params: `conv/kernel` (and `conv/bias` with `use_bias`), `bn/scale` [features].
    """
    features: int
    kernel_size: int = 1
    stride: int = 1
    depthwise: bool = False
    use_bias: bool = False
    activation: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C_in]` -> `[B, H / stride, W / stride, features]`."""
        x = Conv2d(self.features, self.kernel_size, self.stride, self.depthwise, self.use_bias,
                   name="conv")(x)
        x = channel_norm("bn")(x)
        return gelu(x) if self.activation else x


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch. Params: `gamma` [C]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[..., C]` -> `[..., C]`."""
        gamma = self.param("gamma", nn.initializers.constant(LAYER_SCALE_INIT), (x.shape[-1],),
                           jnp.float32)
        return x * gamma.astype(x.dtype)
