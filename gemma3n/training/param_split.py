"""Which weights train: a parameter tree split into a trainable and a frozen tree, and rejoined.

The train state holds the trainable tree (float32, with its optimizer state) and the frozen
tree; `combine` rebuilds the model's params from the two before every forward pass, so the
gradient reaches only what is trainable. Full fine-tuning (`FullFineTuning`: every weight, or
all but those matching freeze patterns) and adapters such as LoRA differ only in `split` and
`combine`: any object with those two methods (`ParamSplit`) plugs into the train step.

Example:
    >>> split = FullFineTuning(freeze=('embedder/*',))
    >>> trainable, frozen = split.split(params)
    >>> params = split.combine(trainable, frozen)     # the model's tree again
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.embedder import EMBEDDING_TABLE_PATH, PER_LAYER_TABLE_PATH
from gemma3n.layers import Int4Weight, QuantizedWeight
from gemma3n.layers.weights import WeightInfo

# Freeze patterns users reach for most: the two vocabulary-sized tables (E4B: 5.4 of its 7.8
# billion weights), which a small data set cannot teach much.
EMBEDDING_TABLES = (EMBEDDING_TABLE_PATH, PER_LAYER_TABLE_PATH)
# Weight leaves holding rounded values: they can be frozen, never trained.
QUANTIZED_LEAVES = (QuantizedWeight, Int4Weight)


class ParamSplit(Protocol):
    """How a parameter tree becomes (trainable, frozen) and back.

    `combine` gives what the model's forward pass takes (for adapters: weights that carry
    them); `export` gives a plain parameter tree to save (for adapters: merged weights);
    `hold_frozen` gives the frozen tree as the train step holds it (`TrainSteps.place`);
    `trainable_schema` says, from the model's weight schema ({path: WeightInfo}), the shape and
    logical axes of each trainable leaf (what shards it on a mesh).
    """

    def split(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]: ...

    def trainable_schema(self, schema: Mapping[str, WeightInfo]) -> dict[str, WeightInfo]: ...

    def combine(self, trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]: ...

    def hold_frozen(self, model: Any, frozen: dict[str, Any]) -> dict[str, Any]: ...

    def export(self, trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class FullFineTuning:
    """Trains every weight except those whose '/'-joined path matches a `freeze` pattern
    (`fnmatch` syntax: 'embedder/*', '*/attn/*')."""
    freeze: tuple[str, ...] = ()

    def is_frozen(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.freeze)

    def split(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        flat = flatten_params(params)
        unused = [pattern for pattern in self.freeze
                  if not any(fnmatch.fnmatchcase(path, pattern) for path in flat)]
        if unused:
            raise ValueError(f'freeze pattern(s) {unused} match no weight of the model (paths look '
                             f'like {next(iter(flat))!r}).')
        trainable = {path: leaf for path, leaf in flat.items() if not self.is_frozen(path)}
        quantized = [path for path, leaf in trainable.items()
                     if isinstance(leaf, QUANTIZED_LEAVES)]
        if quantized:
            raise ValueError(f'{len(quantized)} int8/int4 weights (e.g. {quantized[0]}) cannot be '
                             'fine-tuned: their rounded values have no gradient. Train a LoRA '
                             'adapter over them, or load the weights unquantized.')
        if not trainable:
            raise ValueError(f'the freeze patterns {list(self.freeze)} leave no weight to train.')
        frozen = {path: leaf for path, leaf in flat.items() if self.is_frozen(path)}
        return unflatten_params(trainable), unflatten_params(frozen)

    def combine(self, trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
        return unflatten_params({**flatten_params(frozen), **flatten_params(trainable)})

    def trainable_schema(self, schema: Mapping[str, WeightInfo]) -> dict[str, WeightInfo]:
        return {path: info for path, info in schema.items() if not self.is_frozen(path)}

    def hold_frozen(self, model: Any, frozen: dict[str, Any]) -> dict[str, Any]:
        """As it is: `export` saves the frozen weights with the trained ones, in the
        checkpoint layout."""
        return frozen

    def export(self, trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
        return self.combine(trainable, frozen)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """`tree` with every floating-point leaf cast to `dtype` (the compute dtype); quantized
    weights stay as they are (their float32 or float16 scales define the weight: rounded to
    bfloat16 they would move it by up to 2^-9)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if not isinstance(x, QUANTIZED_LEAVES)
        and jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree, is_leaf=lambda x: isinstance(x, QUANTIZED_LEAVES))
