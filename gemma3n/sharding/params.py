"""The shardings of a parameter tree, from its weights' logical axes, and placing a tree on them.

Each weight's logical axes come from the weight schema (`gemma3n.schema.model_schema`: {path:
WeightInfo(shape, dtype, axes, ...)}, in the checkpoint's axis order). A weight stored as a leaf
type (`gemma3n.layers.StoredWeight`: serving order, int8 with scales) gets a sharding of the
same type: each stored dimension keeps the split of the checkpoint dimension it holds, an int8
weight's scales [out...] that of its output dimensions.

Example:
    >>> shardings = param_shardings(params, model_schema(model), mesh)
    >>> params = shard_params(params, model_schema(model), mesh)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma3n.layers import QuantizedWeight, ServingWeight, StoredWeight
from gemma3n.sharding.rules import ShardingRules, stored_spec


def axis_names(info: Any) -> tuple[str | None, ...]:
    """The logical axis names of a schema entry; a weight declared without names (flax's own
    layers) gets None for each axis: kept whole."""
    return info.axes if info.axes is not None else (None,) * len(info.shape)


def leaf_sharding(path: str, leaf: Any, schema: Mapping[str, Any], mesh: Mesh,
                  rules: ShardingRules) -> Any:
    """The sharding of the leaf at `path` (an array or its shape; a StoredWeight gets one of
    its own type, a sharding per array it holds)."""
    info = schema.get(path)
    if info is None:
        raise ValueError(f'{path} is not in the weight schema: no logical axes say how to '
                         'shard it.')
    if tuple(leaf.shape) != tuple(info.shape):
        raise ValueError(f'{path} has shape {tuple(leaf.shape)}; the schema says {info.shape}.')
    spec = rules.spec(axis_names(info), info.shape, dict(mesh.shape))
    if isinstance(leaf, QuantizedWeight):
        stored = stored_spec(spec, leaf.order)
        return leaf.replace(q=NamedSharding(mesh, stored), scale=NamedSharding(
            mesh, PartitionSpec(*tuple(stored)[:leaf.scale.ndim])))
    if isinstance(leaf, ServingWeight):
        return leaf.replace(value=NamedSharding(mesh, stored_spec(spec, leaf.order)))
    if isinstance(leaf, StoredWeight):
        raise TypeError(f'{path}: no sharding is known for a {type(leaf).__name__}.')
    return NamedSharding(mesh, spec)


def param_shardings(params: Any, schema: Mapping[str, Any], mesh: Mesh,
                    rules: ShardingRules = ShardingRules()) -> Any:
    """A tree like `params` with the sharding of every leaf."""
    flat = traverse_util.flatten_dict(params, sep='/',
                                      is_leaf=lambda _, x: isinstance(x, StoredWeight))
    return traverse_util.unflatten_dict(
        {path: leaf_sharding(path, leaf, schema, mesh, rules) for path, leaf in flat.items()},
        sep='/')


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


def place_leaf(leaf: Any, sharding: Any) -> Any:
    """A weight in memory (host or one device; a StoredWeight with a sharding of its type)
    placed in `sharding`, this process's blocks cut from it."""
    def place(array: Any, array_sharding: NamedSharding) -> jax.Array:
        host = np.asarray(array)
        return place_blocks(host.shape, array_sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, leaf, sharding)


def shard_params(params: Any, schema: Mapping[str, Any], mesh: Mesh,
                 rules: ShardingRules = ShardingRules()) -> Any:
    """`params` (in memory, on one device or the host) placed on `mesh` by the rules.

    Every process must hold the same full values; loading a checkpoint straight into its
    shards is `gemma3n.checkpoints.placement`.
    """
    return place_leaf(params, param_shardings(params, schema, mesh, rules))
