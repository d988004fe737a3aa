"""Inference layouts of a parameter tree: weights re-laid out [out, in], optionally int8.

Checkpoints keep the reference layout. For decoding on CPU, XLA multiplies bfloat16 weights
far faster when the contracted (input) axes come last, so every projection is re-laid out once,
at load, and the large ones can also be quantized to int8 with one scale per output channel
(half the bytes a decode step reads; activations are then quantized per row at run time, see
`gemma3n.layers.einsum`). `load_serving` converts each weight as it is read from the
checkpoint, so memory never holds the whole model twice; `to_serving` converts a tree already in
memory. Both return the model that reads the converted tree.

Example:
    >>> serving_model, params = load_serving('model.safetensors', model, dtype=jnp.bfloat16,
    ...                                      quantize_int8=True)
    >>> serving_model.apply({'params': params}, tokens)
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.checkpoints import load_params
from gemma3n.checkpoints.loader import PER_LAYER_TABLE_PATH
from gemma3n.checkpoints.hf_mapping import flatten_params, unflatten_params
from gemma3n.host_arrays import to_device
from gemma3n.schema import model_schema
from gemma3n.layers import QuantizedWeight
from gemma3n.layers.einsum import INT8_MAX
from gemma3n.transformer import Gemma3nTransformer

# Weights smaller than this stay in their dtype: quantizing them saves nothing measurable.
MIN_QUANTIZED_SIZE = 1 << 16


def quantize(w: jax.Array, num_leading: int) -> QuantizedWeight:
    """Symmetric int8 per output channel; w in serving order, its first `num_leading` axes
    (batch and output) index the channels."""
    w32 = jnp.asarray(w, jnp.float32)
    reduce_axes = tuple(range(num_leading, w32.ndim))
    scale = jnp.max(jnp.abs(w32), axis=reduce_axes) / INT8_MAX
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.round(w32 / jnp.expand_dims(scale, reduce_axes)).astype(jnp.int8)
    return QuantizedWeight(q=q, scale=scale)


# Values quantized per compiled call when converting a weight: XLA's CPU backend computes
# bfloat16 in float32 and materialises the converted input, so converting the E4B embedding in
# one call would hold a 2 GB float32 copy of it; chunks of rows bound that to 64 MB.
QUANTIZE_CHUNK = 1 << 24


_transpose = jax.jit(jnp.transpose, static_argnums=1)


def _relayout(w: Any, order: tuple[int, ...]) -> jax.Array:
    """w transposed to `order`, on the device.

    A host array may be a view (the loader's own layout change): numpy composes the two
    permutations, so at most one copy is made, none at all when they cancel and the loader's
    buffer is aligned for the device to adopt.
    """
    if isinstance(w, np.ndarray):
        return to_device(np.transpose(w, order))
    if order == tuple(range(len(order))):
        return w
    return _transpose(w, order)


_quantize_rows = jax.jit(functools.partial(quantize, num_leading=1))


def _relayout_quantized(w: Any, order: tuple[int, ...], num_leading: int) -> QuantizedWeight:
    """`quantize(transpose(w, order), num_leading)`, a chunk of output channels at a time."""
    moved = _relayout(w, order)
    channels = moved.shape[:num_leading]
    rows = moved.reshape(math.prod(channels), -1)          # [channels, inputs]
    step = max(1, QUANTIZE_CHUNK // rows.shape[1])
    parts = [_quantize_rows(rows[start:start + step]) for start in range(0, rows.shape[0], step)]
    return QuantizedWeight(q=jnp.concatenate([p.q for p in parts]).reshape(moved.shape),
                           scale=jnp.concatenate([p.scale for p in parts]).reshape(channels))


class ServingConverter:
    """Converts one parameter at a time from the reference layout to the serving layout of
    `model`, on the device: projection weights transposed to [batch..., out..., in...] (the
    large ones int8 with `quantize_int8`), everything else moved as it is.

    Usable as the `transform` of `gemma3n.checkpoints.load_params`.

    Example:
        >>> convert = ServingConverter(model, quantize_int8=True)
        >>> leaf = convert('layer_0/mlp/linear', np_array)        # a QuantizedWeight
    """

    def __init__(self, model: Gemma3nTransformer, *, quantize_int8: bool = False):
        if model.serving_layout:
            raise ValueError('model already uses the serving layout.')
        self.quantize_int8 = quantize_int8
        # {path: (serving order, number of input axes)} of every projection weight.
        self.orders = {path: (info.serving_order, len(info.in_axes))
                       for path, info in model_schema(model).items() if info.is_projection}

    def quantizes(self, path: str, size: int) -> bool:
        """Whether the parameter at `path` with `size` values becomes a QuantizedWeight."""
        return self.quantize_int8 and path in self.orders and size >= MIN_QUANTIZED_SIZE

    def __call__(self, path: str, w: Any) -> jax.Array | QuantizedWeight:
        layout = self.orders.get(path)
        if layout is None:
            return jax.block_until_ready(to_device(w))
        order, num_in = layout
        if np.ndim(w) != len(order):
            raise ValueError(f'{path} has rank {np.ndim(w)}, expected {len(order)}.')
        if self.quantizes(path, np.size(w)):
            return jax.block_until_ready(_relayout_quantized(w, order, len(order) - num_in))
        return jax.block_until_ready(_relayout(w, order))


def serving_nbytes(model: Gemma3nTransformer, dtype: Any, *, quantize_int8: bool = False,
                   per_layer_table: bool = False) -> int:
    """Bytes of the parameters a serving load of `model` in `dtype` holds (jax.eval_shape: no
    memory used); the per-layer table only with `per_layer_table` (it is usually read lazily
    from the checkpoint file)."""
    convert = ServingConverter(model.clone(serving_layout=False), quantize_int8=quantize_int8)
    itemsize = np.dtype(dtype).itemsize
    total = 0
    for path, leaf in model_schema(model).items():
        if path == PER_LAYER_TABLE_PATH and not per_layer_table:
            continue
        size = math.prod(leaf.shape)
        if convert.quantizes(path, size):
            order, num_in = convert.orders[path]
            channels = math.prod(leaf.shape[i] for i in order[:len(order) - num_in])
            total += size * np.dtype(np.int8).itemsize + channels * np.dtype(np.float32).itemsize
        else:
            total += size * itemsize
    return total


def to_serving(model: Gemma3nTransformer, params: Any, *, quantize_int8: bool = False,
               consume: bool = False) -> tuple[Gemma3nTransformer, Any]:
    """A serving copy of `model` and `params` (reference layout in, serving layout out, on the
    device).

    With `consume=True` the input tree is emptied as its weights are converted, so a full-size
    model needs memory for one extra weight, not a second copy of the model.
    """
    convert = ServingConverter(model, quantize_int8=quantize_int8)
    flat = flatten_params(params)
    if consume:
        params.clear()
    missing = [path for path in convert.orders if path not in flat]
    if missing:
        raise ValueError(f'params lack {missing[:3]} ({len(missing)} weights missing).')
    for path in sorted(flat, key=lambda p: -np.size(flat[p])):
        flat[path] = convert(path, flat.pop(path))
    return model.clone(serving_layout=True), unflatten_params(flat)


def load_serving(path: str | os.PathLike, model: Gemma3nTransformer, *, dtype: Any = None,
                 quantize_int8: bool = False, progress: bool = True,
                 skip_per_layer_table: bool = False) -> tuple[Gemma3nTransformer, Any]:
    """The serving copy of `model` and the checkpoint at `path` in its layout, converted weight
    by weight while loading (peak memory: the converted model plus the largest weight).

    Args are those of `gemma3n.checkpoints.load_params`; `quantize_int8` as for `to_serving`.
    """
    convert = ServingConverter(model, quantize_int8=quantize_int8)
    params = load_params(path, model=model, dtype=dtype, progress=progress,
                         skip_per_layer_table=skip_per_layer_table, transform=convert)
    return model.clone(serving_layout=True), params
