"""Per-layer input mapping: how each block mixes in its slice of the per-layer embeddings."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.layers import Einsum, RMSNorm
from gemma3n.layers.axes import EMBED, PER_LAYER
from gemma3n.layers.gated_gelu import gated_gelu


class PerLayerMapping(nn.Module):
    """m = norm( (gelu(x · W_gate) · p) · W_proj ): a gated injection of per-layer input p.

    Example:
        >>> mapping = PerLayerMapping(features=8, per_layer_dim=4)
        >>> params = mapping.init(jax.random.key(0), jnp.ones((1, 3, 8)), jnp.ones((1, 3, 4)))
    """
    features: int
    per_layer_dim: int
    guard_precision: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, per_layer_input: jax.Array) -> jax.Array:
        """x: [B, L, D], per_layer_input: [B, L, P] -> [B, L, D]."""
        gate = Einsum((self.features, self.per_layer_dim), (EMBED, PER_LAYER), 0, 1,
                      dtype=self.dtype, name='per_layer_input_gate')('BTD,DP->BTP', x)
        gated = gated_gelu(gate, per_layer_input)
        out = Einsum((self.per_layer_dim, self.features), (PER_LAYER, EMBED), 0, 1,
                     dtype=self.dtype, name='per_layer_projection')('BTP,PD->BTD', gated)
        return RMSNorm(guard_precision=self.guard_precision, dtype=self.dtype, axis_name=EMBED,
                       name='post_per_layer_input_norm')(out)
