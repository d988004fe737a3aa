"""RMSNorm, the normalisation of the Gemma 3n decoder, of its towers and of their embedders."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.layers.precision import guard
from gemma3n.layers.weights import declare

RMS_NORM_EPS = 1e-6


def rms_norm(x: jax.Array, eps: float = RMS_NORM_EPS) -> jax.Array:
    """x · rsqrt(mean(x², last axis) + eps), computed in float32 and cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with an optional learned `scale`.

    The output is multiplied by `scale` (Gemma 3n decoder) or by `1 + scale`
    (`scale_plus_one=True`, the multimodal projection), or by nothing (`with_scale=False`).
    Fresh scales are ones (or zeros when `scale_plus_one`) so an initialised model is not
    degenerate. With an `axis_name` the scale is declared with that logical axis
    (`gemma3n.layers.weights`); without, as a plain parameter (the MobileNet tower's, for now).

    Example:
        >>> norm = RMSNorm(scale_plus_one=False)
        >>> params = norm.init(jax.random.key(0), jnp.ones((2, 8)))  # params['scale']: [8]
    """
    with_scale: bool = True
    scale_plus_one: bool = False
    guard_precision: bool = False
    dtype: jnp.dtype = jnp.float32
    eps: float = RMS_NORM_EPS
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., F] -> [..., F] in x's dtype."""
        normed = rms_norm(guard(x, self.guard_precision), self.eps)
        if not self.with_scale:
            return normed
        init = nn.initializers.zeros if self.scale_plus_one else nn.initializers.ones
        if self.axis_name is None:
            scale = self.param('scale', init, (x.shape[-1],), self.dtype)
        else:
            scale = declare(self, 'scale', (x.shape[-1],), (self.axis_name,), init, self.dtype)
        if self.scale_plus_one:
            scale = 1 + scale.astype(jnp.float32)
        return (normed.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype)
