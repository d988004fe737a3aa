"""Loading a checkpoint straight into its shards on a device mesh.

Each weight goes to the sharding its logical axes give (`gemma3n.sharding`) as it is read, so
no process ever holds the model whole:
- our own format (one safetensors file, our layout) is read block by block: each process reads
  from the file only the blocks its own devices hold, each block once (`place_blocks`), in the
  checkpoint's order or permuted into a stored order on the way;
- the other formats convert a tensor as a whole (Hugging Face's layouts, Orbax's restore), so
  each of their tensors is read whole, one at a time, then cut into this process's blocks: the
  host holds at most one full weight beyond its share (`place_leaf`, a `transform` for
  `load_params`).

Example:
    >>> schema = weight_schema(model, tokens)
    >>> params = load_sharded('e4b.safetensors', model=model, mesh=mesh, schema=schema,
    ...                       dtype=jnp.bfloat16, skip_per_layer_table=True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding

from gemma3n.checkpoints import hf_mapping
from gemma3n.checkpoints.loader import (NATIVE_FORMAT, PER_LAYER_TABLE_PATH, _select,
                                        checkpoint_format, load_params, model_config)
from gemma3n.checkpoints.native import native_catalog
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.layers import QuantizedWeight
from gemma3n.sharding import ShardingRules, place_blocks
from gemma3n.sharding.params import Orders, leaf_sharding
from gemma3n.validation import check_finite


def place_leaf(leaf: Any, sharding: Any) -> Any:
    """A weight in memory (host or one device; a QuantizedWeight with a sharding per field)
    placed in `sharding`, this process's blocks cut from it."""
    if isinstance(leaf, QuantizedWeight):
        return QuantizedWeight(q=place_leaf(leaf.q, sharding.q),
                               scale=place_leaf(leaf.scale, sharding.scale))
    host = np.asarray(leaf)
    return place_blocks(host.shape, sharding, lambda index: host[index])


class MeshPlacement:
    """A `load_params` transform: each converted weight placed on `mesh` by `rules`.

    `convert(path, array)` (optional, e.g. `gemma3n.layout.ServingConverter`) runs first;
    `orders` says which weights it stores in another order.
    """

    def __init__(self, mesh: Mesh, schema: Mapping[str, Any], *,
                 rules: ShardingRules = ShardingRules(), orders: Orders | None = None,
                 convert: Any = None):
        self.mesh, self.schema, self.rules, self.orders = mesh, schema, rules, orders
        self.convert = convert

    def __call__(self, path: str, array: Any) -> Any:
        leaf = array if self.convert is None else self.convert(path, array)
        sharding = leaf_sharding(path, leaf, self.schema, self.mesh, self.rules, self.orders)
        return place_leaf(leaf, sharding)


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


def load_sharded(path: str | os.PathLike, *, model: Any, mesh: Mesh, schema: Mapping[str, Any],
                 dtype: Any = None, rules: ShardingRules = ShardingRules(),
                 orders: Orders | None = None, convert: Any = None, blockwise: bool = True,
                 progress: bool = True, skip_per_layer_table: bool = False) -> dict[str, Any]:
    """The parameter tree of the checkpoint at `path`, every weight in its sharding on `mesh`.

    Args are those of `gemma3n.checkpoints.load_params`, and: `schema` the weights' logical
    axes (`gemma3n.layers.weights.weight_schema`), `rules` the sharding rules, `orders`
    {path: (stored order, input axes)} of weights stored in another order, `convert` the
    conversion that stores them so (`gemma3n.layout.ServingConverter`), `blockwise` whether
    that conversion is only the re-ordering (int8 needs whole rows: False). Our own format is
    then read block by block; otherwise tensor by tensor.
    """
    path = Path(path).expanduser()
    if checkpoint_format(path) != NATIVE_FORMAT or not blockwise:
        placement = MeshPlacement(mesh, schema, rules=rules, orders=orders, convert=convert)
        return load_params(path, model=model, dtype=dtype, progress=progress,
                           skip_per_layer_table=skip_per_layer_table, transform=placement)
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
            order = None if layout is None else layout[0]
            stored = shape if order is None else tuple(shape[i] for i in order)
            sharding = leaf_sharding(name, jax.ShapeDtypeStruct(stored, catalog[name][1]),
                                     schema, mesh, rules, orders)
            flat[name] = _read_native(files, name, sharding, stored, order, dtype)
            bar.update(math.prod(shape))
    return hf_mapping.unflatten_params(flat)
