"""Inference layouts of a parameter tree: weights re-laid out [out, in], optionally int8.

Checkpoints keep the reference layout. For decoding on CPU, XLA multiplies bfloat16 weights
far faster when the contracted (input) axes come last, so `to_serving` re-lays out every
projection once, at load, and can also quantize the large ones to int8 with one scale per
output channel (half the bytes a decode step reads; activations are then quantized per row at
run time, see `gemma3n.layers.einsum`). The returned model reads that tree.

Example:
    >>> serving_model, serving_params = to_serving(model, params, quantize=True)
    >>> serving_model.apply({'params': serving_params}, tokens)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.checkpoints.hf_mapping import flatten_params, unflatten_params
from gemma3n.layers import QuantizedWeight, record_layouts
from gemma3n.layers.einsum import INT8_MAX
from gemma3n.transformer import Gemma3nTransformer

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


def to_serving(model: Gemma3nTransformer, params: Any, *, quantize_int8: bool = False,
               consume: bool = False) -> tuple[Gemma3nTransformer, Any]:
    """A serving copy of `model` and `params` (reference layout in, serving layout out).

    Each projection weight is transposed to [batch..., out..., in...]; with `quantize_int8`
    the large ones become `QuantizedWeight`s. With `consume=True` the input tree is emptied as
    its weights are converted, so a full-size model needs memory for one extra weight, not a
    second copy of the model.
    """
    if model.serving_layout:
        raise ValueError('model already uses the serving layout.')
    orders = serving_orders(model)
    flat = flatten_params(params)
    if consume:
        params.clear()
    missing = ['/'.join(path) for path in orders if '/'.join(path) not in flat]
    if missing:
        raise ValueError(f'params lack {missing[:3]} ({len(missing)} weights missing).')
    for path, (order, num_in) in orders.items():
        key = '/'.join(path)
        w = flat.pop(key)
        if np.ndim(w) != len(order):
            raise ValueError(f'{key} has rank {np.ndim(w)}, expected {len(order)}.')
        moved = jnp.transpose(jnp.asarray(w), order)
        del w
        if quantize_int8 and moved.size >= MIN_QUANTIZED_SIZE:
            moved = quantize(moved, moved.ndim - num_in)
        flat[key] = jax.block_until_ready(moved)
    return model.clone(serving_layout=True), unflatten_params(flat)
