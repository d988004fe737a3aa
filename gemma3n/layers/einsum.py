"""A weight applied with `jnp.einsum`: the einsum string names the axes at the call site."""

from collections.abc import Sequence
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def weight_init(
    in_axis: int | Sequence[int],
    out_axis: int | Sequence[int],
    batch_axis: Sequence[int] = (),
) -> Initializer:
    """Fan-in scaled normal init, so each projection roughly preserves the RMS of its input."""
    return nn.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal',
        in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis)


class Einsum(nn.Module):
    """One weight tensor of a fixed shape, contracted with the input by an einsum string.

    Example:
        >>> proj = Einsum(shape=(8, 4), init=weight_init(0, 1))
        >>> params = proj.init(jax.random.key(0), 'BTD,DF->BTF', jnp.ones((1, 2, 8)))
    """
    shape: tuple[int, ...]
    init: Initializer
    weight_name: str = 'w'
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w = self.param(self.weight_name, self.init, self.shape, self.dtype)
        return jnp.einsum(eqn, x, w)
