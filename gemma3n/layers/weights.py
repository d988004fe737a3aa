"""How a weight is declared once, with its shape, logical axis names and initializer.

Weights created through `declare` carry their logical axis names (Flax's
`with_logical_partitioning`, as MaxText names `kernel_axes` where a weight is declared). From
that single declaration `weight_schema` reads every path, shape and axis tuple (without
allocating), `init_params` draws fresh weights, and a checkpoint mapping only adds names
(`gemma3n.checkpoints.hf_audio`, `hf_mobilenet`). Declared weights keep the checkpoint's axis
order ([out, in] for projections), so loading is a rename. The audio tower, the multimodal
embedders and RMS norms given an `axis_name` declare this way; the text decoder's weights are
still described by `gemma3n.checkpoints.hf_mapping`.

Example:
    >>> schema = weight_schema(AudioEncoder(AudioConfig()), mel, valid)
    >>> schema['conformer_0/attention/attn/q_proj/w']
    WeightInfo(shape=(1536, 1536), dtype=dtype('float32'), axes=('audio_qkv', 'audio_embed'))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from flax import traverse_util

Initializer = Callable[..., jax.Array]


class WeightInfo(NamedTuple):
    """One declared weight: checkpoint-order shape, dtype and logical axis names."""
    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str, ...]


def declare(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str],
            init: Initializer, dtype: Any) -> jax.Array:
    """Declares weight `name` of `module` with its logical `axes` (one name per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f'{name}: {len(axes)} axis names for shape {tuple(shape)}.')
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def weight_schema(module: nn.Module, *inputs: Any) -> dict[str, WeightInfo]:
    """{'/'-joined path: WeightInfo} of every weight `module` declares for `inputs` (no memory)."""
    boxed = jax.eval_shape(module.init, jax.random.key(0), *inputs)['params']
    flat = traverse_util.flatten_dict(boxed, sep='/',
                                      is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
    return {path: WeightInfo(tuple(box.value.shape), box.value.dtype, tuple(box.names))
            for path, box in flat.items()}


def init_params(module: nn.Module, key: jax.Array, *inputs: Any) -> dict[str, Any]:
    """Fresh weights of `module` as a plain nested dict (axis names dropped)."""
    return nn.unbox(module.init(key, *inputs)['params'])
