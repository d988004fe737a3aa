"""int4 weights: groups of `INT4_GROUP` values along the contracted axis share one float16
scale (llama.cpp's Q4_0 rule: the value of largest magnitude in a group maps to -8 exactly).

A weight of serving shape [channels..., in...] is stored as `Int4Weight`: the contracted axes
flattened to K, two values per byte. Products take activation rows quantized to int8 (as the
int8 weights do, `gemma3n.layers.einsum`), so every product of an activation, a 4-bit value and
its scale is exact in float32 (8 + 4 + 11 significant bits): our decode kernel (per-group sums
in int32) and the XLA path (the weight dequantized to float32) differ only in summation order.

Example:
    >>> w4 = quantize_int4(w, num_leading=1)          # w: [N, K], K a multiple of 32
    >>> dequantize(w4).shape                          # (N, K), float32
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from gemma3n.layers import decode_kernels

INT4_GROUP = 32
# Stored nibbles are value + INT4_OFFSET, values in [INT4_MIN, INT4_MAX].
INT4_OFFSET = 8
INT4_MIN, INT4_MAX = -8, 7
_HALF = INT4_GROUP // 2
_LOW_NIBBLE = 0x0F


@flax.struct.dataclass
class Int4Weight:
    """A weight in int4 groups.

    q: uint8 [channels..., K / 2]; in each group of INT4_GROUP values (INT4_GROUP / 2 bytes),
       byte j holds value j + INT4_OFFSET in its low nibble and value j + INT4_GROUP / 2 in its
       high one (the layout the decode kernel unpacks with two instructions).
    scale: float16 [channels..., K / INT4_GROUP].
    """
    q: jax.Array
    scale: jax.Array


def fits_int4(contracted_size: int) -> bool:
    """Whether a weight whose input axes hold `contracted_size` values can be stored in int4."""
    return contracted_size % INT4_GROUP == 0


def quantize_int4(w: jax.Array, num_leading: int) -> Int4Weight:
    """w in serving order, its first `num_leading` axes the channels, the rest flattened to K."""
    channels = w.shape[:num_leading]
    k = math.prod(w.shape[num_leading:])
    if not fits_int4(k):
        raise ValueError(f'int4 needs the input axes to hold a multiple of {INT4_GROUP} values; '
                         f'shape {w.shape} has {k}.')
    groups = jnp.asarray(w, jnp.float32).reshape(channels + (k // INT4_GROUP, INT4_GROUP))
    extreme = jnp.take_along_axis(groups, jnp.argmax(jnp.abs(groups), -1)[..., None], -1)
    scale = (extreme / INT4_MIN).astype(jnp.float16)
    # Quantized with the scale as stored, so the rounding is against the grid actually used.
    step = scale.astype(jnp.float32)
    step = jnp.where(step == 0, 1.0, step)
    values = jnp.clip(jnp.round(groups / step), INT4_MIN, INT4_MAX) + INT4_OFFSET
    nibbles = values.astype(jnp.uint8)
    packed = nibbles[..., :_HALF] | (nibbles[..., _HALF:] << 4)
    return Int4Weight(q=packed.reshape(channels + (k // 2,)), scale=scale[..., 0])


def dequantize(w: Int4Weight) -> jax.Array:
    """The weight as float32 [channels..., K] (each value times its scale: exact in float32)."""
    grouped = w.q.reshape(w.q.shape[:-1] + (-1, _HALF))
    nibbles = jnp.concatenate([grouped & _LOW_NIBBLE, grouped >> 4], axis=-1)
    values = nibbles.astype(jnp.float32) - INT4_OFFSET
    return (values * w.scale[..., None].astype(jnp.float32)).reshape(w.q.shape[:-1] + (-1,))


def _xla_rows_dot(xq: jax.Array, w: Int4Weight) -> jax.Array:
    return jnp.einsum('mk,nk->mn', xq.astype(jnp.float32), dequantize(w),
                      preferred_element_type=jnp.float32)


def rows_dot(xq: jax.Array, w: Int4Weight) -> jax.Array:
    """int8 rows xq [M, K] times the int4 weight w [N, K] (flattened channels) -> [M, N] float32,
    on the decode kernel for up to `decode_kernels.MAX_ROWS` rows on a CPU."""
    if xq.shape[0] > decode_kernels.MAX_ROWS or not decode_kernels.enabled():
        return _xla_rows_dot(xq, w)

    def kernel(xq, w):
        result = jax.ShapeDtypeStruct((xq.shape[0], w.q.shape[0]), jnp.float32)
        return decode_kernels.call('int4', result, xq, w.q, w.scale)

    return jax.lax.platform_dependent(xq, w, cpu=kernel, default=_xla_rows_dot)
