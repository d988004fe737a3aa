"""Mobile multi-query attention (MMQA), the attention block of MobileNet-V5's last two stages.

Every pixel attends to every (possibly downsampled) pixel of its image: `num_heads` query heads
share a single key head and a single value head, all projected by 1 x 1 convolutions; keys and
values may first be downsampled by a strided depthwise conv + RMS norm (`kv_stride`). The block
is pre-norm and residual with a layer scale (timm `MobileAttention` with `MultiQueryAttention2d`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.vision.mobilenet import config as mnv5
from gemma3n.vision.mobilenet.layers import Conv2d, LayerScale, channel_norm


class _Projection(nn.Module):
    """Optional downsampling (`down_conv` depthwise, `norm`), then the 1 x 1 `proj`.

    Params: `down_conv/kernel` [k, k, 1, C] and `norm/scale` [C] when `stride > 1`;
    `proj/kernel` [1, 1, C, features].
    """
    features: int
    stride: int = 1
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H / stride, W / stride, features]`."""
        if self.stride > 1:
            x = Conv2d(x.shape[-1], self.kernel_size, self.stride, depthwise=True,
                       name="down_conv")(x)
            x = channel_norm("norm")(x)
        return Conv2d(self.features, name="proj")(x)


class MultiQueryAttention2d(nn.Module):
    """Multi-query attention over the pixels of `[B, H, W, C]` images.

    Params: `query/proj/kernel` [1, 1, C, N * K]; `key/...` and `value/...` (`_Projection` to K);
    `output/proj/kernel` [1, 1, N * K, C_out], with N heads of size K.
    """
    spec: mnv5.MultiQueryAttention

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C_out]`."""
        spec = self.spec
        batch, height, width, _ = x.shape
        n, k = spec.num_heads, spec.key_dim
        q = _Projection(n * k, name="query")(x).reshape(batch, height * width, n, k)
        key = _Projection(k, spec.kv_stride, spec.kv_kernel, name="key")(x)
        value = _Projection(k, spec.kv_stride, spec.kv_kernel, name="value")(x)
        key = key.reshape(batch, -1, k)                                  # [B, P, K]
        value = value.reshape(batch, -1, k)                              # [B, P, K]
        logits = jnp.einsum("blnk,bpk->bnlp", q, key) * k ** -0.5
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        out = jnp.einsum("bnlp,bpk->blnk", probs, value)
        out = out.reshape(batch, height, width, n * k)
        return _Projection(spec.out_channels, name="output")(out)


class MultiQueryAttentionBlock(nn.Module):
    """`norm` -> `attn` -> `layer_scale`, plus the input when the width is kept.

    Params: `norm/scale` [C], `attn/...` (`MultiQueryAttention2d`), `layer_scale/gamma` [C_out].
    """
    spec: mnv5.MultiQueryAttention

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C_out]`."""
        y = channel_norm("norm")(x)
        y = MultiQueryAttention2d(self.spec, name="attn")(y)
        y = LayerScale(name="layer_scale")(y)
        return y + x if x.shape[-1] == self.spec.out_channels else y
