"""The MobileNet-V5 vision encoder of Gemma 3n: pixels in, a grid of soft tokens out.

`MobileNetV5` runs the stem (3 x 3 stride-2 conv with bias, RMS norm, GELU), the stages of
`config.stages`, and the fusion adapter over the outputs of `config.msfa_stages`, and returns the
tokens in row-major grid order: for the released tower, 768 x 768 images -> `[B, 256, 2048]`
(a 16 x 16 grid), the tensor `transformers` reshapes out of `TimmWrapperModel`'s
`last_hidden_state` in `Gemma3nModel.get_image_features` (before its sqrt(2048) scaling, which
belongs to the embedder).

The parameter tree mirrors timm's `state_dict` one to one: `conv_stem/...`, `blocks_{s}_{b}/...`
(stage s, block b), `msfa/...` (see `gemma3n.checkpoints.hf_mobilenet`).

Example:
    >>> model = MobileNetV5(MOBILENET_V5_300M)
    >>> pixels = preprocess_images([image])                 # float32 [1, 768, 768, 3] in [0, 1]
    >>> params = model.init(jax.random.key(0), pixels)['params']
    >>> tokens = model.apply({'params': params}, pixels)    # float32 [1, 256, 2048]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.vision.mobilenet import config as mnv5
from gemma3n.vision.mobilenet.attention import MultiQueryAttentionBlock
from gemma3n.vision.mobilenet.blocks import EdgeResidualBlock, InvertedBottleneckBlock
from gemma3n.vision.mobilenet.layers import ConvNorm
from gemma3n.vision.mobilenet.msfa import MultiScaleFusionAdapter

PIXELS_RANK = 4          # [B, H, W, C]
STEM = "conv_stem"
MSFA = "msfa"


def block_name(stage: int, index: int) -> str:
    """Our name of block `index` of stage `stage` (timm's `blocks.{stage}.{index}`)."""
    return f"blocks_{stage}_{index}"


def _block(spec: mnv5.BlockSpec, name: str) -> nn.Module:
    if isinstance(spec, mnv5.EdgeResidual):
        return EdgeResidualBlock(spec, name=name)
    if isinstance(spec, mnv5.InvertedBottleneck):
        return InvertedBottleneckBlock(spec, name=name)
    return MultiQueryAttentionBlock(spec, name=name)


class MobileNetV5(nn.Module):
    """Images `[B, S, S, C]` (S = config.image_size, values as the preprocessing leaves them) ->
    soft tokens `[B, msfa_resolution ** 2, hidden_size]`."""
    config: mnv5.MobileNetConfig

    def check_pixels(self, pixels: jax.Array) -> None:
        """Raises ValueError unless `pixels` is `[B, S, S, in_channels]` floating point."""
        config = self.config
        want = (config.image_size, config.image_size, config.in_channels)
        if pixels.ndim != PIXELS_RANK or tuple(pixels.shape[1:]) != want:
            raise ValueError(f"the vision encoder takes pixels [batch, {want[0]}, {want[1]}, "
                             f"{want[2]}]; got shape {tuple(pixels.shape)}")
        if not jnp.issubdtype(pixels.dtype, jnp.floating):
            raise ValueError(f"pixels must be floating point (preprocess_images output); got "
                             f"{pixels.dtype}")

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """`[B, S, S, C]` -> `[B, R * R, hidden_size]`, token r * R + c for grid cell (r, c)."""
        self.check_pixels(pixels)
        config = self.config
        x = ConvNorm(config.stem_channels, mnv5.STEM_KERNEL, mnv5.STEM_STRIDE, use_bias=True,
                     name=STEM)(pixels)
        taps = []
        for stage, blocks in enumerate(config.stages):
            for index, spec in enumerate(blocks):
                x = _block(spec, block_name(stage, index))(x)
            if stage in config.msfa_stages:
                taps.append(x)
        grid = MultiScaleFusionAdapter(config.hidden_size, config.msfa_resolution,
                                       config.msfa_expansion, name=MSFA)(taps)
        return grid.reshape(grid.shape[0], -1, grid.shape[-1])
