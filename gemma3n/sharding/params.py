"""The shardings of a parameter tree, from its weights' logical axes, and placing a tree on them.

Each weight's logical axes come from the weight schema (`gemma3n.layers.weights.weight_schema`:
{path: WeightInfo(shape, dtype, axes)}, in the checkpoint's axis order). A weight stored in
another order (the serving layout's [out..., in...]) keeps, per stored dimension, the split of
the checkpoint dimension it holds; an int8 weight's scales [out...] follow its output axes.

Example:
    >>> schema = weight_schema(model, tokens)
    >>> shardings = param_shardings(params, schema, mesh)
    >>> params = jax.device_put(params, shardings)       # or shard_params(params, schema, mesh)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from gemma3n.layers import QuantizedWeight
from gemma3n.sharding.rules import ShardingRules, stored_spec

# {path: (serving order, number of input axes)}, as `gemma3n.layout.serving_orders` gives it.
Orders = Mapping[str, tuple[tuple[int, ...], int]]


def leaf_sharding(path: str, leaf: Any, schema: Mapping[str, Any], mesh: Mesh,
                  rules: ShardingRules, orders: Orders | None = None) -> Any:
    """The sharding of one stored leaf at `path` (a QuantizedWeight gets one of the same type,
    a sharding per field)."""
    info = schema.get(path)
    if info is None:
        raise ValueError(f'{path} is not in the weight schema: no logical axes say how to '
                         'shard it.')
    # A weight declared without names (flax's own layers) is kept whole.
    names = info.axes if info.axes is not None else (None,) * len(info.shape)
    spec = rules.spec(names, info.shape, dict(mesh.shape))
    layout = None if orders is None else orders.get(path)
    order = None if layout is None else layout[0]
    stored = stored_spec(spec, order)
    if isinstance(leaf, QuantizedWeight):
        if layout is None:
            raise ValueError(f'{path} is an int8 weight but no serving order was given for it.')
        num_out = len(order) - layout[1]
        return QuantizedWeight(q=NamedSharding(mesh, stored),
                               scale=NamedSharding(mesh, type(stored)(*tuple(stored)[:num_out])))
    shape = tuple(leaf.shape)
    expected = info.shape if order is None else tuple(info.shape[i] for i in order)
    if shape != expected:
        raise ValueError(f'{path} has shape {shape}; the schema says {expected}.')
    return NamedSharding(mesh, stored)


def param_shardings(params: Any, schema: Mapping[str, Any], mesh: Mesh,
                    rules: ShardingRules = ShardingRules(),
                    orders: Orders | None = None) -> Any:
    """A tree like `params` with the sharding of every leaf."""
    is_weight = lambda x: isinstance(x, QuantizedWeight)
    flat = traverse_util.flatten_dict(params, sep='/', is_leaf=lambda _, x: is_weight(x))
    return traverse_util.unflatten_dict(
        {path: leaf_sharding(path, leaf, schema, mesh, rules, orders)
         for path, leaf in flat.items()}, sep='/')


def place_blocks(shape: tuple[int, ...], sharding: NamedSharding,
                 read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """The array of `shape` in `sharding`, this process's blocks made by `read(index)`.

    Each distinct block is read once, however many of this process's devices hold it (JAX's
    `make_array_from_callback` reads it once per device), and only blocks of this process's
    devices are read: with several processes each reads its own part.
    """
    blocks: dict[tuple, np.ndarray] = {}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if key not in blocks:
            blocks[key] = read(index)
        arrays.append(jax.device_put(blocks[key], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def shard_params(params: Any, schema: Mapping[str, Any], mesh: Mesh,
                 rules: ShardingRules = ShardingRules(), orders: Orders | None = None) -> Any:
    """`params` (in memory, on one device or the host) placed on `mesh` by the rules.

    Every process must hold the same full values; loading a checkpoint straight into its
    shards is `gemma3n.checkpoints.placement`.
    """
    def place(leaf, sharding):
        host = np.asarray(leaf)
        return place_blocks(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, params,
                                  param_shardings(params, schema, mesh, rules, orders))
