"""The gated feed-forward network, with Gemma 3n's gaussian top-k activation sparsity."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.scipy.stats

from gemma3n import sparse_rows
from gemma3n.layers import contract, projection_param
from gemma3n.layers.axes import EMBED, GATE, MLP
from gemma3n.layers.gated_gelu import gated_gelu, paired_gated_gelu


def gaussian_topk(gate: jax.Array, sparsity: float) -> jax.Array:
    """Keeps roughly the top (1 - sparsity) fraction of `gate` along the last axis.

    Assuming the activations are gaussian, the cutoff is mean + std · Φ⁻¹(sparsity) (population
    std); everything below it becomes 0 and the rest is shifted down by the cutoff.

    Args:
        gate: [..., F] gate pre-activations.
        sparsity: fraction to zero, in (0, 1).
    """
    g32 = gate.astype(jnp.float32)
    z = jax.scipy.stats.norm.ppf(jnp.float32(sparsity)).astype(gate.dtype).astype(jnp.float32)
    mean = jnp.mean(g32, axis=-1, keepdims=True)
    std = jnp.std(g32, axis=-1, keepdims=True)
    return jax.nn.relu(g32 - (mean + std * z)).astype(gate.dtype)


class FeedForward(nn.Module):
    """gelu(gate) · up, projected back to the model width.

    Params: `gating_einsum` [2, F, D] (or [2, D, F] without `transpose_gating_einsum`) and
    `linear` [F, D] (checkpoint order; a params leaf may store them otherwise, see
    `gemma3n.layers.einsum`).

    Example:
        >>> ffn = FeedForward(features=8, hidden_dim=32, transpose_gating_einsum=True)
        >>> params = ffn.init(jax.random.key(0), jnp.ones((1, 3, 8)))
    """
    features: int
    hidden_dim: int
    transpose_gating_einsum: bool
    sparsity: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]."""
        f, d = self.hidden_dim, self.features
        # The gate and up weights stacked along C, in checkpoint order.
        if self.transpose_gating_einsum:
            w_spec, shape, axes = 'CFD', (2, f, d), (GATE, MLP, EMBED)
        else:
            w_spec, shape, axes = 'CDF', (2, d, f), (GATE, EMBED, MLP)
        gating = projection_param(self, 'gating_einsum', shape, axes, w_spec.index('D'),
                                  w_spec.index('F'), self.dtype)
        gating_eqn = f'BTD,{w_spec}->CBTF'
        linear = projection_param(self, 'linear', (f, d), (MLP, EMBED), 0, 1, self.dtype)
        if self.sparsity > 0.0 and sparse_rows.applies(gating, linear, x):
            # The gate alone, then only the kept units' rows (gemma3n.sparse_rows).
            gate_w, up_w = sparse_rows.stacked_parts(gating)
            gate = contract(f'BTD,{w_spec[1:]}->BTF', x, gate_w)
            return sparse_rows.sparse_ffn(x, gaussian_topk(gate, self.sparsity), up_w,
                                          f'TD,{w_spec[1:]}->TF', linear, self.sparsity)
        gate_up = contract(gating_eqn, x, gating)              # [2, B, L, F]
        if self.sparsity > 0.0:
            gate = gaussian_topk(gate_up[0], self.sparsity)
            hidden = gated_gelu(gate, gate_up[1])
        else:
            hidden = paired_gated_gelu(gate_up)
        return contract('BTF,FD->BTD', hidden, linear)
