"""Next-token cross-entropy in float32, counted only where a loss mask says so."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [B, L, V], targets int [B, L] -> per-token cross-entropy [B, L] in float32.

    logits[b, t] predicts targets[b, t] (the data pipeline shifts the targets by one).
    """
    logits = logits.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_norm - target_logit


def masked_loss_sum(logits: jax.Array, targets: jax.Array,
                    loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of the masked token losses, number of masked tokens), both float32 scalars.

    Sums, not a mean: micro-batches of an accumulated step add up exactly, and the step
    divides once by the whole batch's count.
    """
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(token_losses(logits, targets) * mask), jnp.sum(mask)
