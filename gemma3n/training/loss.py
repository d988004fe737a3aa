"""Next-token cross-entropy in float32, counted only where a loss mask says so.

`masked_loss_sum` takes the logits. `chunked_loss_sums` takes the final hidden states and the
unembedding instead, and never holds the logits of more than a chunk of tokens: with E4B's
262144-entry vocabulary the logits of 4 x 512 tokens are 2 GiB in float32, and the loss and
its gradient would hold several such arrays at once.

Example:
    >>> total, count = chunked_loss_sums(unembed, head_params, hidden, targets, loss_mask)
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gemma3n.layers import cross_entropy

# Float32 logits held at a time by `chunked_loss_sums` (about three arrays this size live at
# once: the logits, their softmax and the gradient). 256 MB is 256 rows of E4B's vocabulary:
# the head's products run faster with more rows (its backward [rows, 262144] x [262144, 2048]:
# 0.30 TFLOP/s at 128 rows, 0.44 at 256), a LoRA step at 1 x 512 7.6% faster than at 128 MB.
LOSS_CHUNK_BYTES = 1 << 28


def masked_loss_sum(logits: jax.Array, targets: jax.Array,
                    loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of the masked token losses, number of masked tokens), both float32 scalars, from
    logits [..., V] (bfloat16 logits take our cross-entropy kernel where it runs:
    `gemma3n.layers.cross_entropy`) and targets and loss_mask [...]. logits[..., t] predicts
    targets[..., t] (the data pipeline shifts the targets by one).

    Sums, not a mean: micro-batches of an accumulated step add up exactly, and the step
    divides once by the whole batch's count.
    """
    mask = loss_mask.astype(jnp.float32)
    vocab = logits.shape[-1]
    total = cross_entropy.masked_sum(logits.reshape(-1, vocab), targets.reshape(-1),
                                     mask.reshape(-1))
    return total, jnp.sum(mask)


Unembed = Callable[[Any, jax.Array], jax.Array]


def chunked_loss_sums(unembed: Unembed, head_params: Any, hidden: jax.Array, targets: jax.Array,
                      loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`masked_loss_sum(unembed(head_params, hidden), targets, loss_mask)`, a chunk of tokens
    at a time.

    unembed(head_params, h [R, C, D]) -> logits [R, C, V]; hidden [*B, L, D]; targets
    and loss_mask [*B, L]. Differentiable in hidden and head_params. The forward pass computes
    each chunk's gradient right after its loss (the loss is a sum, so a chunk's gradient is its
    own), keeps only the gradient of the hidden states (and of the head's parameters, where
    they are differentiated), and drops the chunk's logits: the logits are computed once, as in
    the unchunked loss, and never all held. Each token's loss and gradient are the unchunked
    ones; sums over tokens differ only in summation order.
    """
    return _chunked(unembed, head_params, hidden, targets, loss_mask)


def _chunk_length(rows: int, length: int, vocab: int) -> int:
    """Positions per chunk: LOSS_CHUNK_BYTES of float32 logits over all rows, 1 to length."""
    per_position = rows * vocab * jnp.dtype(jnp.float32).itemsize
    return max(1, min(length, LOSS_CHUNK_BYTES // per_position))


def _scan_chunks(unembed: Unembed, head_params: Any, hidden: jax.Array, targets: jax.Array,
                 loss_mask: jax.Array, grad_hidden: bool, grad_params: bool):
    """(total, count, gradient of total in hidden or None, in head_params or None), a chunk
    of positions at a time (`lax.scan`). The chunks cut the sequence axis, not the rows, so
    rows spread over devices stay where they are."""
    length, d = hidden.shape[-2:]
    rows = hidden.reshape(-1, length, d)                      # [R, L, D]
    vocab = jax.eval_shape(unembed, head_params,
                           jax.ShapeDtypeStruct((1, 1, d), hidden.dtype)).shape[-1]
    size = _chunk_length(rows.shape[0], length, vocab)
    chunks = -(-length // size)
    pad = chunks * size - length

    def split(x: jax.Array) -> jax.Array:   # [R, L, ...] -> [chunks, R, size, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((x.shape[0], chunks, size) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    # A padding position's mask is 0: it adds nothing to the sums or the gradients.
    xs = (split(rows), split(targets.reshape(-1, length)), split(loss_mask.reshape(-1, length)))

    def chunk_loss(params, h, t, m):
        return masked_loss_sum(unembed(params, h), t, m)

    argnums = tuple(i for i, wanted in ((0, grad_params), (1, grad_hidden)) if wanted)
    # The head's gradient is carried only where it is wanted: a frozen table (E4B: 2 GiB in
    # float32) gets no zero-filled accumulator.
    zero_params = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), head_params)
                   if grad_params else None)

    def body(carry, chunk):
        total, count, d_params = carry
        if argnums:
            (s, c), grads = jax.value_and_grad(chunk_loss, argnums, has_aux=True)(
                head_params, *chunk)
        else:
            (s, c), grads = chunk_loss(head_params, *chunk), ()
        grads = dict(zip(argnums, grads))
        if grad_params:
            d_params = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), d_params, grads[0])
        return (total + s, count + c, d_params), grads.get(1)

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero_params)
    (total, count, d_params), d_hidden = jax.lax.scan(body, init, xs)
    if grad_hidden:                      # [chunks, R, size, D] -> hidden's shape
        d_hidden = jnp.moveaxis(d_hidden, 0, 1).reshape(rows.shape[0], -1, d)[:, :length]
        d_hidden = d_hidden.reshape(hidden.shape)
    if grad_params:
        d_params = jax.tree.map(lambda g, p: g.astype(p.dtype), d_params, head_params)
    return total, count, d_hidden, (d_params if grad_params else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(unembed, head_params, hidden, targets, loss_mask):
    total, count, _, _ = _scan_chunks(unembed, head_params, hidden, targets, loss_mask,
                                      grad_hidden=False, grad_params=False)
    return total, count


def _chunked_fwd(unembed, head_params, hidden, targets, loss_mask):
    # symbolic_zeros: each input arrives as a CustomVJPPrimal saying whether it is
    # differentiated, so a frozen unembedding (LoRA) costs no gradient product.
    values = lambda tree: jax.tree.map(lambda p: p.value, tree)
    perturbed = lambda tree: any(p.perturbed for p in jax.tree.leaves(tree))
    total, count, d_hidden, d_params = _scan_chunks(
        unembed, values(head_params), hidden.value, targets.value, loss_mask.value,
        grad_hidden=hidden.perturbed, grad_params=perturbed(head_params))
    return (total, count), (d_params, d_hidden)


def _chunked_bwd(unembed, residuals, cotangents):
    d_params, d_hidden = residuals
    g = cotangents[0]         # the count does not depend on the inputs
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    scale = lambda tree: None if tree is None else jax.tree.map(lambda x: (x * g).astype(x.dtype), tree)
    return scale(d_params), scale(d_hidden), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)
