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

from collections.abc import Mapping
from typing import Any

import jax
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
    spec = rules.spec(info.axes, info.shape, dict(mesh.shape))
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


def shard_params(params: Any, schema: Mapping[str, Any], mesh: Mesh,
                 rules: ShardingRules = ShardingRules(), orders: Orders | None = None) -> Any:
    """`params` (in memory, on one device or the host) placed on `mesh` by the rules.

    Every process must hold the same full values; loading a checkpoint straight into its
    shards is `gemma3n.checkpoints.placement`.
    """
    return jax.device_put(params, param_shardings(params, schema, mesh, rules, orders))
