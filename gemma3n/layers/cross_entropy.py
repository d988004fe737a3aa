"""Softmax cross-entropy of bfloat16 logits with its gradient in one pass of our kernel
(`kernels/cross_entropy.h`), for a training loss's chunk of logits.

    >>> total = masked_sum(logits, targets, weights)   # logits [N, V] bf16 -> float32 scalar

`masked_sum` is Σ_n weights[n] · (logsumexp(logits[n]) - logits[n, targets[n]]), differentiable
in the logits. Where the kernel runs (`applies`), the forward pass computes each row's gradient
with its loss (the softmax less the target's one-hot, times its weight, rounded to bfloat16 once,
as a bfloat16 product's cotangent is) and the backward pass only scales it; elsewhere, and for a
loss taken without its gradient, the same sums on XLA in float32.

Why: with E4B's 262144-entry vocabulary a LoRA step spends much of its time outside the
products in the loss (measured in bench/README.md): XLA's CPU backend converts each chunk of
bfloat16 logits [256, 262144] to float32, reduces it twice as trees of windows, exponentiates
it twice and converts the float32 gradient back, each a pass over 67M values. The kernel reads
each row three times while it stays in L2 and writes the bfloat16 gradient once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma3n.layers import decode_kernels, gemm


def applies(logits: jax.Array) -> bool:
    """Whether `masked_sum` of these logits takes the kernel: bfloat16 [N, V] logits on a CPU
    where our kernels of many rows run (AVX-512, one device: `gemm.available()`)."""
    return logits.dtype == jnp.bfloat16 and logits.ndim == 2 and gemm.available()


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [..., V], targets int [...] -> per-token cross-entropy [...] in float32, on XLA."""
    logits = logits.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_norm - target_logit


def _xla_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(token_losses(logits, targets) * weights)


def _kernel(logits: jax.Array, targets: jax.Array, weights: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
    """(weighted losses [N] float32, their gradient [N, V] bfloat16), on the kernel."""
    n, v = logits.shape
    result = (jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n, v), jnp.bfloat16))
    return jax.ffi.ffi_call(decode_kernels.TARGETS['cross_entropy'], result)(
        logits, targets.astype(jnp.int32), weights.astype(jnp.float32))


@jax.custom_vjp
def _masked_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    return _xla_sum(logits, targets, weights)


def _masked_sum_fwd(logits, targets, weights):
    losses, grad = _kernel(logits, targets, weights)
    return jnp.sum(losses), grad


def _masked_sum_bwd(grad, g):
    # A loss's own cotangent is 1, which XLA folds away: no pass over the gradient.
    return (grad * g.astype(grad.dtype), None, None)


_masked_sum.defvjp(_masked_sum_fwd, _masked_sum_bwd)


def masked_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ weights[n] · cross-entropy of logits [N, V] at targets [N] (int) -> float32 scalar;
    differentiable in the logits only. On the kernel where it `applies`."""
    if not applies(logits):
        return _xla_sum(logits, targets, weights)
    return _masked_sum(logits, targets, weights)
