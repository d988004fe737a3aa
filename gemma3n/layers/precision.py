"""Rounding guards: keep XLA from carrying excess precision through fused low-precision math."""

import jax
import jax.numpy as jnp


def guard(x: jax.Array, enabled: bool = True) -> jax.Array:
    """Rounds `x` to the precision of its own dtype (a no-op in plain arithmetic).

    XLA may keep bf16 intermediates in float32 inside a fusion; the reference model rounds at
    fixed points (norm inputs, attention logits, the first AltUp stream) so results do not
    depend on how the compiler fused the graph.
    """
    if not enabled or not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
