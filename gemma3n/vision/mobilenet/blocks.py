"""The convolutional blocks of MobileNet-V5: edge residual and universal inverted bottleneck.

Both widen the channels (`expansion`), mix space with a k x k convolution and project back; the
input is added back when the block keeps the shape. Names of submodules follow timm's blocks.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from gemma3n.vision.mobilenet import config as mnv5
from gemma3n.vision.mobilenet.layers import Conv2d, ConvNorm, LayerScale, channel_norm, gelu


class EdgeResidualBlock(nn.Module):
    """Fused inverted residual (timm `EdgeResidual`): full conv to the expanded width, GELU, 1 x 1
    projection. No layer scale.

    Params: `conv_exp/kernel` [k, k, C_in, M], `bn1/scale` [M], `conv_pwl/kernel` [1, 1, M, C_out],
    `bn2/scale` [C_out], with M = make_divisible(C_in * expansion).
    """
    spec: mnv5.EdgeResidual

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C_in]` -> `[B, H / stride, W / stride, C_out]`."""
        spec, in_channels = self.spec, x.shape[-1]
        mid = mnv5.make_divisible(in_channels * spec.expansion)
        y = Conv2d(mid, spec.kernel, spec.stride, name="conv_exp")(x)
        y = gelu(channel_norm("bn1")(y))
        y = Conv2d(spec.out_channels, name="conv_pwl")(y)
        y = channel_norm("bn2")(y)
        if spec.stride == 1 and in_channels == spec.out_channels:
            y = y + x
        return y


class InvertedBottleneckBlock(nn.Module):
    """Universal inverted bottleneck (timm `UniversalInvertedResidual`).

    dw_start (depthwise, no activation) -> pw_exp (1 x 1, GELU) -> dw_mid (depthwise, GELU) ->
    pw_proj (1 x 1, no activation) -> layer_scale, each conv followed by an RMS norm; the
    depthwise convs exist only when their kernel size is non-zero. The fusion adapter uses one
    without layer scale or residual (`layer_scale=False, residual=False`).

    Params: `dw_start/{conv/kernel [k, k, 1, C_in], bn/scale}`, `pw_exp/{conv/kernel
    [1, 1, C_in, M], bn/scale}`, `dw_mid/{conv/kernel [k, k, 1, M], bn/scale}`,
    `pw_proj/{conv/kernel [1, 1, M, C_out], bn/scale}`, `layer_scale/gamma` [C_out].
    """
    spec: mnv5.InvertedBottleneck
    layer_scale: bool = True
    residual: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C_in]` -> `[B, H / stride, W / stride, C_out]`."""
        spec, in_channels = self.spec, x.shape[-1]
        if spec.stride > 1 and not (spec.start_kernel or spec.mid_kernel):
            raise ValueError(f"an inverted bottleneck with stride {spec.stride} needs a start or "
                             f"middle depthwise kernel; got {spec}")
        mid = mnv5.make_divisible(in_channels * spec.expansion)
        y = x
        if spec.start_kernel:
            start_stride = 1 if spec.mid_kernel else spec.stride
            y = ConvNorm(in_channels, spec.start_kernel, start_stride, depthwise=True,
                         activation=False, name="dw_start")(y)
        y = ConvNorm(mid, name="pw_exp")(y)
        if spec.mid_kernel:
            y = ConvNorm(mid, spec.mid_kernel, spec.stride, depthwise=True, name="dw_mid")(y)
        y = ConvNorm(spec.out_channels, activation=False, name="pw_proj")(y)
        if self.layer_scale:
            y = LayerScale(name="layer_scale")(y)
        if self.residual and spec.stride == 1 and in_channels == spec.out_channels:
            y = y + x
        return y
