"""Inference layouts of a parameter tree: weights re-laid out [out, in], optionally int8 or int4.

Checkpoints keep the reference layout. For decoding on CPU, XLA multiplies bfloat16 weights
far faster when the contracted (input) axes come last, so every projection (the weights the
schema declares with output axes, `gemma3n.schema`) is re-laid out once, at load, into a
`ServingWeight` leaf, and the large ones can instead become `QuantizedWeight` leaves, int8 with
one scale per output channel (half the bytes a decode step reads; `gemma3n.layers.int8`), or
`Int4Weight` leaves, int4 in groups of 32 inputs (`gemma3n.layers.int4`). The
leaf says how a weight is stored, so the same model reads either tree. `load_serving` converts
each weight as it is read from the checkpoint, so memory never holds the whole model twice;
`to_serving` converts a tree already in memory. Both return the model with the tree (the same
model: no module depends on the layout).

Example:
    >>> model, params = load_serving('model.safetensors', model, dtype=jnp.bfloat16,
    ...                              quantize_int8=True)
    >>> model.apply({'params': params}, tokens)
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gemma3n.checkpoints import load_params
from gemma3n.checkpoints.placement import load_sharded
from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.embedder import PER_LAYER_TABLE_PATH
from gemma3n.host_arrays import to_device
from gemma3n.layers import QuantizedWeight, ServingWeight, StackedWeight, StoredWeight
from gemma3n.layers.int4 import INT4_GROUP, fits_int4, quantize_int4_in_chunks
from gemma3n.layers.int8 import quantize, quantize_in_chunks
from gemma3n.schema import model_schema
from gemma3n.sharding import ShardingRules
from gemma3n.transformer import Gemma3nTransformer

# Weights smaller than this stay in their dtype: quantizing them saves nothing measurable.
MIN_QUANTIZED_SIZE = 1 << 16
# The FFN's stacked gate-and-up projection and its down projection (`gemma3n.ffn`).
GATING, DOWN = 'gating_einsum', 'linear'
__all__ = ['MIN_QUANTIZED_SIZE', 'ServingConverter', 'load_serving', 'quantize', 'serving_nbytes',
           'to_serving']


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


class ServingConverter:
    """Converts one parameter at a time from the reference layout to the serving layout of
    `model`, on the device: projection weights transposed to [batch..., out..., in...] (the
    large ones int8 with `quantize_int8`; int4 with `quantize_int4` where their inputs hold a
    multiple of 32 values, else int8), everything else moved as it is. With `sparse_rows` the
    FFN weights of the sparse layers are stored for `gemma3n.sparse_rows`: the gating as a
    `StackedWeight` (gate, up), the down projection [F, D] rows first.

    Usable as the `transform` of `gemma3n.checkpoints.load_params`.

    Example:
        >>> convert = ServingConverter(model, quantize_int8=True)
        >>> leaf = convert('layer_0/mlp/linear', np_array)        # a QuantizedWeight
    """

    def __init__(self, model: Gemma3nTransformer, *, quantize_int8: bool = False,
                 quantize_int4: bool = False, sparse_rows: bool = True):
        if quantize_int8 and quantize_int4:
            raise ValueError('choose int8 or int4 weights, not both.')
        self.quantize_int8 = quantize_int8
        self.quantize_int4 = quantize_int4
        # {path: (serving order, number of input axes)} of every projection weight.
        self.orders = {path: (info.serving_order, len(info.in_axes))
                       for path, info in model_schema(model).items() if info.is_projection}
        # The FFN weights of the sparse layers, stored for reading the kept units' rows.
        self.sparse_gating, self.sparse_down = set(), set()
        if sparse_rows:
            for path, info in model_schema(model).items():
                if info.is_projection and is_sparse_ffn_weight(model.config, path):
                    (self.sparse_gating if path.endswith(GATING) else self.sparse_down).add(path)

    def quantization(self, path: str, shape: tuple[int, ...]) -> str | None:
        """'int8' or 'int4' if the parameter at `path` of (checkpoint) `shape` is quantized."""
        if (not (self.quantize_int8 or self.quantize_int4) or path not in self.orders
                or math.prod(shape) < MIN_QUANTIZED_SIZE):
            return None
        order, num_in = self.orders[path]
        inputs = math.prod(shape[i] for i in order[len(order) - num_in:])
        # A down projection kept rows first stays int8: int4 groups along its rows could not
        # be gathered row by row, groups along D no kernel reads (measured: slower than dense).
        return ('int4' if self.quantize_int4 and fits_int4(inputs)
                and path not in self.sparse_down else 'int8')

    def __call__(self, path: str, w: Any) -> jax.Array | StoredWeight:
        if isinstance(w, StoredWeight):
            raise ValueError(f'{path} is already in a serving layout ({type(w).__name__}).')
        layout = self.orders.get(path)
        if layout is None:
            return jax.block_until_ready(to_device(w))
        order, num_in = layout
        if np.ndim(w) != len(order):
            raise ValueError(f'{path} has rank {np.ndim(w)}, expected {len(order)}.')
        fmt = self.quantization(path, np.shape(w))
        if path in self.sparse_down:
            return jax.block_until_ready(_rows_first(w, order, fmt))
        moved = _relayout(w, order)
        if path in self.sparse_gating:
            # One leaf per stacked index (gate, up), each a [F, D] weight in serving order.
            part_order = tuple(axis - 1 for axis in order[1:])
            parts = tuple(_convert(moved[i], part_order, len(order) - num_in - 1, fmt)
                          for i in range(moved.shape[0]))
            return jax.block_until_ready(StackedWeight(parts))
        return jax.block_until_ready(_convert(moved, order, len(order) - num_in, fmt))


def is_sparse_ffn_weight(config: Any, path: str) -> bool:
    """Whether `path` is a FFN projection of a layer with activation sparsity."""
    match = re.fullmatch(r'layer_(\d+)/mlp/(\w+)', path)
    return bool(match) and match[2] in (GATING, DOWN) and config.sparsity(int(match[1])) > 0.0


def _convert(moved: jax.Array, order: tuple[int, ...], num_leading: int, fmt: str | None
             ) -> jax.Array | StoredWeight:
    """A weight already in serving order as the leaf of format `fmt` (None: unquantized)."""
    if fmt is None:
        return ServingWeight(moved, order)
    quantizer = quantize_int4_in_chunks if fmt == 'int4' else quantize_in_chunks
    return quantizer(moved, num_leading, order)


def _rows_first(w: Any, order: tuple[int, ...], fmt: str | None) -> StoredWeight:
    """A down projection [F, D] kept in its checkpoint order, rows first, so the rows of the
    kept FFN units are contiguous (`gemma3n.sparse_rows`); int8 (never int4, see
    `ServingConverter.quantization`) has the same values and per-output scales as in serving
    order."""
    identity = tuple(range(len(order)))
    if fmt is None:
        return ServingWeight(_relayout(w, identity), identity)
    by_output = quantize_in_chunks(_relayout(w, order), len(order) - 1, order)
    return QuantizedWeight(_transpose(by_output.q, tuple(int(a) for a in np.argsort(order))),
                           by_output.scale, identity, scale_last=True)


def serving_nbytes(model: Gemma3nTransformer, dtype: Any, *, quantize_int8: bool = False,
                   quantize_int4: bool = False, per_layer_table: bool = False) -> int:
    """Bytes of the parameters a serving load of `model` in `dtype` holds (jax.eval_shape: no
    memory used); the per-layer table only with `per_layer_table` (it is usually read lazily
    from the checkpoint file)."""
    convert = ServingConverter(model, quantize_int8=quantize_int8, quantize_int4=quantize_int4)
    itemsize = np.dtype(dtype).itemsize
    total = 0
    for path, leaf in model_schema(model).items():
        if path == PER_LAYER_TABLE_PATH and not per_layer_table:
            continue
        size = math.prod(leaf.shape)
        fmt = convert.quantization(path, leaf.shape)
        if fmt == 'int4':     # two values a byte, a float16 scale per group
            total += size // 2 + size // INT4_GROUP * np.dtype(np.float16).itemsize
        elif fmt == 'int8':
            order, num_in = convert.orders[path]
            channels = math.prod(leaf.shape[i] for i in order[:len(order) - num_in])
            total += size * np.dtype(np.int8).itemsize + channels * np.dtype(np.float32).itemsize
        else:
            total += size * itemsize
    return total


def to_serving(model: Gemma3nTransformer, params: Any, *, quantize_int8: bool = False,
               quantize_int4: bool = False, consume: bool = False, sparse_rows: bool = True
               ) -> tuple[Gemma3nTransformer, Any]:
    """`model` and a serving copy of `params` (reference layout in, serving layout out, on the
    device).

    With `consume=True` the input tree is emptied as its weights are converted, so a full-size
    model needs memory for one extra weight, not a second copy of the model. With `sparse_rows`
    the FFN weights of layers with activation sparsity are stored for decoding only the kept
    units' rows (`gemma3n.sparse_rows`): gate and up as separate leaves, the down projection
    rows first.
    """
    convert = ServingConverter(model, quantize_int8=quantize_int8, quantize_int4=quantize_int4,
                               sparse_rows=sparse_rows)
    flat = flatten_params(params)
    if consume:
        params.clear()
    missing = [path for path in convert.orders if path not in flat]
    if missing:
        raise ValueError(f'params lack {missing[:3]} ({len(missing)} weights missing).')
    for path in sorted(flat, key=lambda p: -np.size(flat[p])):
        flat[path] = convert(path, flat.pop(path))
    return model, unflatten_params(flat)


def load_serving(path: str | os.PathLike, model: Gemma3nTransformer, *, dtype: Any = None,
                 quantize_int8: bool = False, quantize_int4: bool = False, progress: bool = True,
                 skip_per_layer_table: bool = False, mesh: Mesh | None = None,
                 sharding_rules: ShardingRules = ShardingRules()) -> tuple[Gemma3nTransformer, Any]:
    """`model` and the checkpoint at `path` in the serving layout, converted weight by weight
    while loading (peak memory: the converted model plus the largest weight).

    Args are those of `gemma3n.checkpoints.load_params`; `quantize_int8` and `quantize_int4` as
    for `to_serving`. With a `mesh`, each weight goes straight into its shards by
    `sharding_rules` (`gemma3n.checkpoints.placement`).
    """
    # The sparse layers' FFN leaves have no sharding yet: on a mesh they keep the serving order.
    convert = ServingConverter(model, quantize_int8=quantize_int8, quantize_int4=quantize_int4,
                               sparse_rows=mesh is None)
    if mesh is None:
        params = load_params(path, model=model, dtype=dtype, progress=progress,
                             skip_per_layer_table=skip_per_layer_table, transform=convert)
    else:
        params = load_sharded(path, model=model, mesh=mesh, schema=model_schema(model),
                              dtype=dtype, rules=sharding_rules, orders=convert.orders,
                              convert=convert, progress=progress,
                              blockwise=not (quantize_int8 or quantize_int4),
                              skip_per_layer_table=skip_per_layer_table)
    return model, params
