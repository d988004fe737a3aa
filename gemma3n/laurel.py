"""LAuReL: a learned low-rank residual branch beside attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.layers import Einsum
from gemma3n.layers.axes import EMBED, LAUREL


class Laurel(nn.Module):
    """h -> (h · W_left) · W_right, a rank-`rank` linear map of the block input.

    The block adds it to h after its own norm (`post_laurel_norm`, a sibling module).

    Example:
        >>> laurel = Laurel(features=8, rank=2)
        >>> params = laurel.init(jax.random.key(0), jnp.ones((1, 3, 8)))
    """
    features: int
    rank: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]."""
        left = Einsum((self.features, self.rank), (EMBED, LAUREL), 0, 1, dtype=self.dtype, name='linear_left')
        right = Einsum((self.rank, self.features), (LAUREL, EMBED), 0, 1, dtype=self.dtype, name='linear_right')
        return right('BTR,RD->BTD', left('BTD,DR->BTR', x))
