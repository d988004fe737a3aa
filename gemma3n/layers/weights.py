"""How a weight is declared once, with its shape, initializer and logical axis names.

Every weight of the model is created through `declare`, which names each dimension logically
(`gemma3n.layers.axes`; as MaxText names `kernel_axes` where a weight is declared) and, for a
projection, which of its axes it contracts with the input (`in_axes`) and which it produces
(`out_axes`). The declaration is recorded beside the parameter, in the `WEIGHT_INFO` variable
collection (so `init(...)['params']` stays a plain tree of arrays), and `weight_schema` reads
every path, shape, dtype and declaration from one `jax.eval_shape` of `init` (no memory). That
schema is what checkpoint validation, the Hugging Face mapping (which only adds names and
conversions), the serving layout, sharding rules and LoRA targets read. Declared weights keep
the checkpoint's axis order, so loading is a rename.

Example:
    >>> schema = weight_schema(AudioEncoder(AudioConfig()), mel, valid)
    >>> schema['conformer_0/attention/attn/q_proj/w']
    WeightInfo(shape=(1536, 1536), dtype=dtype('float32'), axes=('audio_qkv', 'audio_embed'), in_axes=(1,), out_axes=())
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import numpy as np
from flax import traverse_util

Initializer = Callable[..., jax.Array]
# The variable collection holding each weight's `Declaration`, at the weight's own path.
WEIGHT_INFO = 'weight_info'


@flax.struct.dataclass
class Declaration:
    """What `declare` records of a weight besides its shape: static, so it holds no arrays."""
    axes: tuple[str, ...] = flax.struct.field(pytree_node=False)
    in_axes: tuple[int, ...] = flax.struct.field(pytree_node=False)
    out_axes: tuple[int, ...] = flax.struct.field(pytree_node=False)


class WeightInfo(NamedTuple):
    """One weight: checkpoint-order shape, dtype, one logical name per axis (None: not
    declared), and the axes contracted with the input (its fan-in) and produced (a projection's
    output)."""
    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str, ...] | None
    in_axes: tuple[int, ...] = ()
    out_axes: tuple[int, ...] = ()

    @property
    def is_projection(self) -> bool:
        """Applied with `gemma3n.layers.einsum.contract`: it may be stored in serving order."""
        return bool(self.out_axes)

    @property
    def serving_order(self) -> tuple[int, ...]:
        """The permutation from checkpoint order to serving order [batch..., out..., in...]."""
        return serving_order(len(self.shape), self.in_axes, self.out_axes)


def batch_axes(ndim: int, in_axes: Sequence[int], out_axes: Sequence[int]) -> tuple[int, ...]:
    """The axes of an `ndim` weight that are neither in `in_axes` nor in `out_axes`."""
    return tuple(i for i in range(ndim) if i not in in_axes and i not in out_axes)


def serving_order(ndim: int, in_axes: Sequence[int], out_axes: Sequence[int]) -> tuple[int, ...]:
    """The permutation from checkpoint order to serving order [batch..., out..., in...]: XLA's
    CPU backend multiplies bfloat16 weights far faster with the contracted axes last."""
    return batch_axes(ndim, in_axes, out_axes) + tuple(out_axes) + tuple(in_axes)


def declare(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str],
            init: Initializer, dtype: Any, *, in_axes: Sequence[int] = (),
            out_axes: Sequence[int] = ()) -> jax.Array:
    """Declares weight `name` of `module`: `shape`, one logical name per axis, `init`, `dtype`.

    `in_axes` are the axes contracted with the input (the fan-in; empty for scales) and
    `out_axes`, given only for a weight applied with `contract`, the axes it produces. Returns
    the params leaf: at `apply`, whatever representation the tree stores the weight in.
    """
    shape, axes, in_axes, out_axes = tuple(shape), tuple(axes), tuple(in_axes), tuple(out_axes)
    if len(axes) != len(shape):
        raise ValueError(f'{name}: {len(axes)} axis names for shape {shape}.')
    if set(in_axes) & set(out_axes) or not set(in_axes + out_axes) <= set(range(len(shape))):
        raise ValueError(f'{name}: in_axes {in_axes} and out_axes {out_axes} must be distinct '
                         f'axes of shape {shape}.')
    if module.has_variable('params', name) and not module.is_initializing():
        # The leaf may store the weight in another representation (a serving-order or int8
        # weight, `gemma3n.layers.einsum`): it is returned as it is, checked by its
        # checkpoint-order shape.
        leaf = module.get_variable('params', name)
        if tuple(leaf.shape) != shape:
            raise ValueError(f'Parameter {"/".join(module.scope.path + (name,))} has shape '
                             f'{tuple(leaf.shape)}, expected {shape} for this model config.')
        return leaf
    value = module.param(name, init, shape, dtype)
    if module.is_initializing():
        module.variable(WEIGHT_INFO, name, Declaration, axes, in_axes, out_axes)
    return value


def weight_schema(module: nn.Module, *inputs: Any, **kwargs: Any) -> dict[str, WeightInfo]:
    """{'/'-joined path: WeightInfo} of every weight `module` creates for `inputs` (no memory).

    Weights created by flax's own layers (the seed's SigLIP encoder) are not declared: their
    `axes` is None.
    """
    # Array inputs (or their ShapeDtypeStructs) are traced; anything else stays a Python value.
    is_array = [isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)) for x in inputs]

    def init(key, *arrays):
        given = iter(arrays)
        args = [next(given) if traced else x for x, traced in zip(inputs, is_array)]
        return module.init(key, *args, **kwargs)

    shapes = jax.eval_shape(init, jax.random.key(0), *(x for x, t in zip(inputs, is_array) if t))
    params = traverse_util.flatten_dict(shapes['params'], sep='/')
    declared = traverse_util.flatten_dict(shapes.get(WEIGHT_INFO, {}), sep='/',
                                          is_leaf=lambda _, x: isinstance(x, Declaration))
    schema = {}
    for path, leaf in params.items():
        info = declared.get(path)
        schema[path] = WeightInfo(tuple(leaf.shape), leaf.dtype, None) if info is None else \
            WeightInfo(tuple(leaf.shape), leaf.dtype, info.axes, info.in_axes, info.out_axes)
    return schema


def init_params(module: nn.Module, key: jax.Array, *inputs: Any) -> dict[str, Any]:
    """Fresh weights of `module` as a plain nested dict."""
    return module.init(key, *inputs)['params']
