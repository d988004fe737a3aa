"""Inference layouts of a parameter tree: weights re-laid out [out, in], optionally int8.

Checkpoints keep the reference layout. For decoding on CPU, XLA multiplies bfloat16 weights
far faster when the contracted (input) axes come last, so `to_serving` re-lays out every
projection once, at load, and can also quantize the large ones to int8 with one scale per
output channel (half the bytes a decode step reads). The returned model reads that tree.

Example:
    >>> serving_model, serving_params = to_serving(model, params, quantize=True)
    >>> serving_model.apply({'params': serving_params}, tokens)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.layers import QuantizedWeight, record_layouts
from gemma3n.transformer import Gemma3nTransformer

INT8_MAX = 127
# Weights smaller than this stay in their dtype: quantizing them saves nothing measurable.
MIN_QUANTIZED_SIZE = 1 << 16


def serving_orders(model: Gemma3nTransformer
                   ) -> dict[tuple[str, ...], tuple[tuple[int, ...], int]]:
    """{param path: (serving axis order, number of input axes)} for every projection weight."""
    reference = model.clone(serving_layout=False)
    with record_layouts() as found:
        jax.eval_shape(reference.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
    return found


def quantize(w: jax.Array, num_leading: int) -> QuantizedWeight:
    """Symmetric int8 per output channel; w in serving order, its first `num_leading` axes
    (batch and output) index the channels."""
    w32 = jnp.asarray(w, jnp.float32)
    reduce_axes = tuple(range(num_leading, w32.ndim))
    scale = jnp.max(jnp.abs(w32), axis=reduce_axes) / INT8_MAX
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.round(w32 / jnp.expand_dims(scale, reduce_axes)).astype(jnp.int8)
    return QuantizedWeight(q=q, scale=scale)


def to_serving(model: Gemma3nTransformer, params: Any, *, quantize_int8: bool = False
               ) -> tuple[Gemma3nTransformer, Any]:
    """A serving copy of `model` and `params` (reference layout in, serving layout out).

    Each projection weight is transposed to [batch..., out..., in...]; with `quantize_int8`
    the large ones become `QuantizedWeight`s. Weights are converted one at a time.
    """
    if model.serving_layout:
        raise ValueError('model already uses the serving layout.')
    orders = serving_orders(model)
    out = jax.tree_util.tree_map(lambda x: x, params)     # a new tree; leaves replaced below
    for path, (order, num_in) in orders.items():
        node = out
        for key in path[:-1]:
            if key not in node:
                raise ValueError(f'params lack {"/".join(path)}.')
            node = node[key]
        w = node[path[-1]]
        expected = len(order)
        if np.ndim(w) != expected:
            raise ValueError(f'{"/".join(path)} has rank {np.ndim(w)}, expected {expected}.')
        moved = jnp.transpose(jnp.asarray(w), order)
        if quantize_int8 and moved.size >= MIN_QUANTIZED_SIZE:
            moved = quantize(moved, moved.ndim - num_in)
        node[path[-1]] = moved
    return model.clone(serving_layout=True), out

