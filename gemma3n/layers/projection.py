"""A bias-free linear map whose weight is declared in the checkpoint's [out, in] order.

Example:
    >>> proj = Projection(64, ('audio_ffw', 'audio_embed'))
    >>> y = proj.apply({'params': p}, x)          # [..., in] -> [..., 64]; p['w']: [64, in]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.layers.einsum import weight_init
from gemma3n.layers.weights import declare

OUT_AXIS, IN_AXIS = 0, 1


class Projection(nn.Module):
    """`[..., in]` -> `[..., features]` with weight `w` [features, in], logical axes `axes`
    (output's name, input's name)."""
    features: int
    axes: tuple[str, str]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., features] in x's dtype."""
        w = declare(self, 'w', (self.features, x.shape[-1]), self.axes,
                    weight_init(IN_AXIS, OUT_AXIS), self.dtype, in_axes=(IN_AXIS,))
        return jnp.einsum('...i,oi->...o', x, w.astype(x.dtype))
