"""LoRA fine-tuning as a `ParamSplit`: only low-rank factors train, the base stays frozen.

`split` draws the factors of every targeted weight (PEFT's initialisation: `a` uniform in
±1/sqrt(fan_in), as torch's nn.Linear default gives lora_A; `b` zeros, so training starts from
the base model exactly); `combine` wraps each targeted base leaf, whatever its representation
(bfloat16, float32, int8), in a `LoRAWeight`; `export` merges the adapters into the base.
A run holds its frozen base in the serving layout (`hold_frozen`: weights [out, in], whose
bfloat16 products XLA's CPU backend runs fastest), or with `quantize` int8 or int4 (half or a
quarter of the memory; their products pass the gradient to the layers before by the
straight-through rule, `gemma3n.layers.int8`); merging takes the checkpoint-order base.
Targets are named as PEFT names them for Gemma (`gemma3n.checkpoints.peft_adapter.LORA_TARGETS`)
and found through the Hugging Face mapping; a half of a stacked weight (k_proj of kv_einsum)
that is not targeted holds zero factors, which get zero gradients and stay zero. Dropout on the
adapter input is not supported (PEFT's lora_dropout 0).

Example:
    >>> split = LoRA(config, rank=8, alpha=16, targets=('q_proj', 'v_proj'))
    >>> trainable, frozen = split.split(params)     # trainable: {path/lora_a, path/lora_b}
    >>> model.apply({'params': split.combine(trainable, frozen)}, tokens)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.checkpoints.peft_adapter import (LORA_TARGETS, Adapter, Slot, check_targets,
                                              target_slots)
from gemma3n.config import TransformerConfig
from gemma3n.embedder import EMBEDDING_TABLE_PATH
from gemma3n.layout import ServingConverter, is_sparse_ffn_weight
from gemma3n.layers import ServingWeight, StackedWeight, StoredWeight, masked_rows
from gemma3n.layers.einsum import HEAD_TOKENS_FIRST_ROWS, TOKENS_FIRST_ROWS
from gemma3n.layers.lora import LoRAWeight
from gemma3n.layers.weights import WeightInfo
from gemma3n.sharding.params import axis_names

A_NAME, B_NAME = 'lora_a', 'lora_b'


@dataclasses.dataclass(frozen=True)
class LoRA:
    """rank, alpha (scale alpha / rank), the PEFT targets, the seed of the factors;
    `initial`: {path: (a, b)} to start from instead (a loaded adapter); `quantize`: None,
    'int8' or 'int4', how `hold_frozen` stores the large weights of the base."""
    config: TransformerConfig = dataclasses.field(repr=False)
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0
    initial: Mapping[str, tuple[Any, Any]] | None = dataclasses.field(default=None, repr=False)
    quantize: str | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f'LoRA rank must be at least 1, got {self.rank}.')
        if self.quantize not in (None, 'int8', 'int4'):
            raise ValueError(f"LoRA's base is held as None, 'int8' or 'int4', not "
                             f'{self.quantize!r}.')
        check_targets(tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def slots(self) -> dict[str, list[Slot]]:
        """{path: its targeted slots} of the targeted weights."""
        by_path: dict[str, list[Slot]] = {}
        for slot in target_slots(self.config, tuple(self.targets)):
            by_path.setdefault(slot.path, []).append(slot)
        return by_path

    def split(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        flat = flatten_params(params)
        trainable = {}
        key = jax.random.key(self.seed)
        for index, (path, slots) in enumerate(self.slots().items()):
            if path not in flat or tuple(flat[path].shape) != slots[0].shape:
                raise ValueError(f'LoRA target {path} {slots[0].shape} is not in the parameters '
                                 'or has another shape: the params do not match the config.')
            if self.initial is not None:
                a, b = self._initial(path, slots[0])
            else:
                a, b = self._draw(jax.random.fold_in(key, index), slots)
            trainable[f'{path}/{A_NAME}'], trainable[f'{path}/{B_NAME}'] = a, b
        return unflatten_params(trainable), params

    def _draw(self, key: jax.Array, slots: list[Slot]) -> tuple[jax.Array, jax.Array]:
        slot = slots[0]
        stack = slot.shape[:slot.stacked]
        bound = 1.0 / math.sqrt(math.prod(slot.in_shape))
        a = jax.random.uniform(key, stack + slot.in_shape + (self.rank,), jnp.float32,
                               -bound, bound)
        if slot.stacked:    # halves without an adapter keep zero factors
            targeted = np.zeros(stack, bool)
            targeted[[s.half for s in slots]] = True
            a = jnp.where(jnp.asarray(targeted).reshape(stack + (1,) * (a.ndim - 1)), a, 0.0)
        b = jnp.zeros(stack + (self.rank,) + slot.out_shape, jnp.float32)
        return a, b

    def _initial(self, path: str, slot: Slot) -> tuple[jax.Array, jax.Array]:
        if path not in self.initial:
            raise ValueError(f'the initial adapter has no factors for {path}.')
        a, b = (jnp.asarray(f, jnp.float32) for f in self.initial[path])
        stack = slot.shape[:slot.stacked]
        if (a.shape, b.shape) != (stack + slot.in_shape + (self.rank,),
                                  stack + (self.rank,) + slot.out_shape):
            raise ValueError(f'the initial adapter of {path} has shapes {a.shape}, {b.shape}, '
                             f'not those of rank {self.rank} on {slot.shape}.')
        return a, b

    def trainable_schema(self, schema: Mapping[str, WeightInfo]) -> dict[str, WeightInfo]:
        """Each factor's shape and axes: `a` [stacked..., in..., r] keeps the names of the
        weight's stacked and input axes, `b` [stacked..., r, out...] those of its stacked and
        output axes; the rank axis has none (never split)."""
        trainable = {}
        for path, slots in self.slots().items():
            slot, names = slots[0], axis_names(schema[path])
            stack = tuple(range(slot.stacked))
            out = tuple(i for i in range(len(slot.shape))
                        if i >= slot.stacked and i not in slot.in_axes)
            for name, kept, rank_at in ((A_NAME, stack + slot.in_axes, len(slot.in_axes)),
                                        (B_NAME, stack + out, 0)):
                dims = [(slot.shape[i], names[i]) for i in kept]
                dims.insert(slot.stacked + rank_at, (self.rank, None))
                trainable[f'{path}/{name}'] = WeightInfo(
                    tuple(n for n, _ in dims), jnp.float32, tuple(a for _, a in dims))
        return trainable

    def combine(self, trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
        flat = flatten_params(frozen)
        factors = flatten_params(trainable)
        for path, slots in self.slots().items():
            flat[path] = LoRAWeight(base=flat[path], a=factors[f'{path}/{A_NAME}'],
                                    b=factors[f'{path}/{B_NAME}'], scale=self.scale,
                                    in_axes=slots[0].in_axes, stacked=slots[0].stacked)
        return unflatten_params(flat)

    def hold_frozen(self, model: Any, frozen: dict[str, Any]) -> dict[str, Any]:
        """The frozen base with every plain projection weight in the serving layout
        (`gemma3n.layout`: [out, in], the layout whose bfloat16 products XLA's CPU backend runs
        fast; measured at E4B widths: a LoRA step twice as fast as over checkpoint-order
        weights), the large ones int8 or int4 as `quantize` says. `frozen` is consumed:
        emptied as its weights are converted, so memory holds one weight more, not a second
        base. Weights already stored otherwise (a tree loaded int8) are kept as they are.

        The sparse layers' FFN weights are stored rows first, as decoding stores them
        (`gemma3n.sparse_rows`), where the masked-rows kernels take a batch's tokens (bfloat16,
        `masked_rows`): each token then reads only its kept units' rows. Elsewhere they keep
        the serving layout, whose dense products are fastest there. Products with a batch's
        tokens put them first (`TOKENS_FIRST_ROWS`), the tied unembedding's with a loss
        chunk's from fewer rows (`HEAD_TOKENS_FIRST_ROWS`).
        """
        flat = flatten_params(frozen)
        convert = ServingConverter(model, sparse_rows=self._masked_rows(flat),
                                   quantize_int8=self.quantize == 'int8',
                                   quantize_int4=self.quantize == 'int4')
        frozen.clear()
        for path in convert.orders:
            if path in flat and not isinstance(flat[path], StoredWeight):
                rows = HEAD_TOKENS_FIRST_ROWS if path == EMBEDDING_TABLE_PATH else TOKENS_FIRST_ROWS
                flat[path] = _tokens_first(convert(path, flat.pop(path)), rows)
        return unflatten_params(flat)

    def _masked_rows(self, flat: dict[str, Any]) -> bool:
        """Whether the masked-rows kernels will take the sparse layers' FFN (flat: the frozen
        base, its FFN weights still plain arrays)."""
        ffn = [leaf for path, leaf in flat.items() if is_sparse_ffn_weight(self.config, path)]
        downs = [leaf for leaf in ffn if np.ndim(leaf) == 2]
        return (self.quantize is None and bool(downs)
                and all(isinstance(leaf, (np.ndarray, jax.Array)) and leaf.dtype == jnp.bfloat16
                        for leaf in ffn)
                and all(masked_rows.applies(jax.ShapeDtypeStruct((1, leaf.shape[1]), leaf.dtype),
                                            leaf) for leaf in downs))

    def export(self, trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
        """The base with every adapter merged (`LoRAWeight.merge`)."""
        return jax.tree.map(lambda leaf: leaf.merge() if isinstance(leaf, LoRAWeight) else leaf,
                            self.combine(trainable, frozen),
                            is_leaf=lambda leaf: isinstance(leaf, LoRAWeight))

    def factors(self, trainable: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{path: (a, b)} as numpy, what `peft_adapter.save_adapter` writes."""
        flat = flatten_params(trainable)
        return {path: (np.asarray(flat[f'{path}/{A_NAME}']), np.asarray(flat[f'{path}/{B_NAME}']))
                for path in self.slots()}


def _tokens_first(held: Any, rows: int) -> Any:
    """A held frozen weight whose products with `rows` rows of x or more put x's axes first
    (`ServingWeight.tokens_first_rows`), a `StackedWeight`'s parts too."""
    if isinstance(held, StackedWeight):
        return held.replace(parts=tuple(_tokens_first(part, rows) for part in held.parts))
    if isinstance(held, ServingWeight):
        return held.replace(tokens_first_rows=rows)
    return held


def apply_adapter(adapter: Adapter, config: TransformerConfig, params: dict[str, Any], *,
                  merge: bool = False) -> dict[str, Any]:
    """`params` (any representation) running `adapter`; `merge`: folded into plain
    checkpoint-order weights (for export) instead of wrapped."""
    split = LoRA(config, rank=adapter.rank, alpha=adapter.alpha, targets=adapter.targets,
                 initial=adapter.factors)
    trainable, frozen = split.split(params)
    return (split.export if merge else split.combine)(trainable, frozen)
