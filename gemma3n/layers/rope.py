"""Rotary position embeddings, half-split (not interleaved) as in Gemma."""

import jax
import jax.numpy as jnp


def apply_rope(
    x: jax.Array, positions: jax.Array, *, base_frequency: float, scale_factor: float = 1.0
) -> jax.Array:
    """Rotates each head of `x` by its token's position.

    Args:
        x: [B, L, N, H] queries or keys.
        positions: [B, L] integer positions.
        base_frequency: timescale_i = base^(2i/H), i < H/2.
        scale_factor: positions are divided by it (>= 1 stretches the context).
    Returns:
        [B, L, N, H] in x's dtype; the first half of each head is rotated against the second.
    """
    half = x.shape[-1] // 2
    fraction = 2 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1]
    timescale = base_frequency ** fraction                                  # [H/2]
    angle = positions[..., None].astype(jnp.float32) / timescale / scale_factor  # [B, L, H/2]
    sin = jnp.sin(angle)[:, :, None, :]                                      # [B, L, 1, H/2]
    cos = jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
