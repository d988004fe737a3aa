"""How the audio tower declares its weights: once, with shape, logical axes and initializer.

Every weight of `gemma3n.audio` is created through `declare`, which attaches its logical axis
names (Flax's `with_logical_partitioning`, as MaxText names `kernel_axes` where a weight is
declared). From that single declaration `weight_schema` reads every path, shape and axis tuple
(without allocating), `init_params` draws fresh weights, and the checkpoint mapping
(`gemma3n.checkpoints.hf_audio`) only adds Hugging Face names. Weights keep the checkpoint's
axis order ([out, in] for projections, OIHW / [C, 1, K] for convolutions) so loading is a rename.

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
import jax.numpy as jnp
from flax import traverse_util

from gemma3n.layers.norm import rms_norm

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


def fan_in_init(in_axes: Sequence[int], out_axis: int) -> Initializer:
    """Fan-in scaled normal init, so each projection roughly preserves the RMS of its input."""
    return nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                            in_axis=tuple(in_axes), out_axis=out_axis)


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


class Projection(nn.Module):
    """A bias-free linear map with weight `w` [out, in] (the checkpoint's order).

    Example:
        >>> y = Projection(64, ('audio_ffw', 'audio_embed')).apply({'params': p}, x)  # [..., 64]
    """
    features: int
    axes: tuple[str, str]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., features]."""
        w = declare(self, 'w', (self.features, x.shape[-1]), self.axes,
                    fan_in_init((1,), 0), self.dtype)
        return jnp.einsum('...i,oi->...o', x, w.astype(x.dtype))


class AudioRMSNorm(nn.Module):
    """RMS normalisation over the last axis, times a learned `scale` [F] unless `with_scale` is off.

    The audio tower multiplies by `scale` itself (not `1 + scale` as the text decoder's
    multimodal norms do), and some of its norms have an `eps` of their own.
    """
    eps: float
    axis_name: str = 'audio_embed'
    with_scale: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., F] -> [..., F] in x's dtype."""
        normed = rms_norm(x, self.eps)
        if not self.with_scale:
            return normed
        scale = declare(self, 'scale', (x.shape[-1],), (self.axis_name,),
                        nn.initializers.ones, self.dtype)
        return (normed.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype)
