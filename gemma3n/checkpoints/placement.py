"""Loading a checkpoint straight into its shards on a device mesh.

Each weight goes to the sharding its logical axes give (`gemma3n.sharding`) as it is read, so
no process ever holds the model whole:
- our own format (our layout) is read block by block: each process reads from the file only
  the blocks its own devices hold, each block once (`place_blocks`), permuted into the serving
  order on the way where asked;
- the other formats convert a tensor as a whole (Hugging Face's layouts, Orbax's restore), and
  int8 needs whole rows for its scales, so there each tensor is read whole, one at a time,
  converted, then cut into this process's blocks: the host holds at most one full weight beyond
  its share (`MeshPlacement`, a `transform` for `load_params`).

Example:
    >>> params = load_sharded('e4b.safetensors', model=model, mesh=mesh,
    ...                       schema=model_schema(model), dtype=jnp.bfloat16,
    ...                       skip_per_layer_table=True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding

from gemma3n.checkpoints.flat_params import unflatten_params
from gemma3n.checkpoints.loader import (NATIVE_FORMAT, PER_LAYER_TABLE_PATH, Checkpoint, _select,
                                        load_params, model_config, open_checkpoint)
from gemma3n.checkpoints.native import native_catalog
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.layers import ServingWeight
from gemma3n.sharding import ShardingRules
from gemma3n.sharding.params import leaf_sharding, place_blocks, place_leaf
from gemma3n.validation import check_finite

# {path: (serving order, number of input axes)}, as `gemma3n.layout.ServingConverter.orders`.
Orders = Mapping[str, tuple[tuple[int, ...], int]]


class MeshPlacement:
    """A `load_params` transform: each weight converted by `convert(path, array)` (optional,
    e.g. `gemma3n.layout.ServingConverter`), then placed on `mesh` by `rules`."""

    def __init__(self, mesh: Mesh, schema: Mapping[str, Any], *,
                 rules: ShardingRules = ShardingRules(), convert: Any = None):
        self.mesh, self.schema, self.rules, self.convert = mesh, schema, rules, convert

    def __call__(self, path: str, array: Any) -> Any:
        leaf = array if self.convert is None else self.convert(path, array)
        return place_leaf(leaf, leaf_sharding(path, leaf, self.schema, self.mesh, self.rules))


def _read_native(files: SafetensorsFiles, name: str, sharding: NamedSharding,
                 stored: tuple[int, ...], order: tuple[int, ...] | None, dtype: Any) -> Any:
    """One tensor of our format in `sharding`, stored with shape `stored` in `order` (None: the
    file's), each block read from the file alone, cast to `dtype` and checked for NaN/Inf."""
    def read(index: tuple[slice, ...]) -> np.ndarray:
        if order is None:
            block = files.read_block(name, index)
        else:
            in_file = [slice(None)] * len(order)
            for stored_axis, file_axis in enumerate(order):
                in_file[file_axis] = index[stored_axis]
            block = np.ascontiguousarray(np.transpose(files.read_block(name, tuple(in_file)),
                                                      order))
        if dtype is not None:
            with np.errstate(over='ignore'):      # check_finite reports it, naming the tensor
                block = block.astype(dtype, copy=False)
        check_finite(f'Tensor {files.describe(name)}', block)
        return block

    return place_blocks(stored, sharding, read)


def load_sharded(path: str | os.PathLike | Checkpoint, *, model: Any, mesh: Mesh,
                 schema: Mapping[str, Any], dtype: Any = None, rules: ShardingRules = ShardingRules(),
                 orders: Orders | None = None, convert: Any = None, blockwise: bool = True,
                 progress: bool = True, skip_per_layer_table: bool = False) -> dict[str, Any]:
    """The parameter tree of the checkpoint at `path`, every weight in its sharding on `mesh`.

    Args are those of `gemma3n.checkpoints.load_params` (`path` may be a `Checkpoint` already
    opened, as `gemma3n.load` passes it), and: `schema` the weights' logical
    axes (`gemma3n.schema.model_schema`), `rules` the sharding rules, `orders` the weights to
    store in serving order (`ServingWeight`), `convert` the conversion a whole tensor goes
    through (`gemma3n.layout.ServingConverter`), `blockwise` whether that conversion is only
    the re-ordering by `orders` (int8 needs whole rows: False). Our own format is then read
    block by block; otherwise tensor by tensor.
    """
    checkpoint = open_checkpoint(path)
    if checkpoint.format != NATIVE_FORMAT or not blockwise:
        placement = MeshPlacement(mesh, schema, rules=rules, convert=convert)
        return load_params(checkpoint, model=model, dtype=dtype, progress=progress,
                           skip_per_layer_table=skip_per_layer_table, transform=placement)
    path = checkpoint.path
    files = SafetensorsFiles([path])
    catalog = native_catalog(files)
    config, text_only = model_config(model)
    skip = {PER_LAYER_TABLE_PATH} if skip_per_layer_table else set()
    names = _select(catalog, config, text_only, path, skip)
    dtype = None if dtype is None else np.dtype(dtype)
    flat = {}
    with tqdm.tqdm(total=sum(math.prod(catalog[n][0]) for n in names), unit='param',
                   desc=f'Loading {path.name} onto {mesh.size} devices', unit_scale=True,
                   disable=not progress) as bar:
        for name in names:
            shape = catalog[name][0]
            layout = None if orders is None else orders.get(name)
            shapes = jax.ShapeDtypeStruct(shape, catalog[name][1])
            if layout is None:
                sharding = leaf_sharding(name, shapes, schema, mesh, rules)
                flat[name] = _read_native(files, name, sharding, shape, None, dtype)
            else:
                order = layout[0]
                stored = tuple(shape[i] for i in order)
                sharding = leaf_sharding(name, ServingWeight(
                    jax.ShapeDtypeStruct(stored, catalog[name][1]), order), schema, mesh, rules)
                flat[name] = ServingWeight(
                    _read_native(files, name, sharding.value, stored, order, dtype), order)
            bar.update(math.prod(shape))
    return unflatten_params(flat)
