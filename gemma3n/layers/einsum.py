"""Weights applied with `jnp.einsum`, in the checkpoint's axis order or a faster serving order.

Every projection weight is declared with its checkpoint shape and which axes it reads (`in`),
writes (`out`) and batches over. Stored that way it loads checkpoints with no conversion. For
inference it can be re-laid out once into the serving order [batch..., out..., in...] (contracted
axes last), which XLA's CPU backend multiplies many times faster in bfloat16, and optionally
quantized to int8 per output channel (`gemma3n.layout` converts a parameter tree). The einsum
string at each call site always names the checkpoint order; it is rewritten for the stored one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gemma3n.layers.weights import batch_axes, declare, serving_order

Initializer = Callable[..., jax.Array]
Axes = int | Sequence[int]
INT8_MAX = 127

@flax.struct.dataclass
class QuantizedWeight:
    """A weight stored as int8 with one float32 scale per output channel.

    q: int8 weight in serving order [batch..., out..., in...].
    scale: float32 [batch..., out...]; the weight is q · scale.
    """
    q: jax.Array
    scale: jax.Array


def _axes(axes: Axes) -> tuple[int, ...]:
    return (axes,) if isinstance(axes, int) else tuple(axes)


def weight_init(in_axis: Axes, out_axis: Axes, batch_axis: Sequence[int] = ()) -> Initializer:
    """Fan-in scaled normal init, so each projection roughly preserves the RMS of its input."""
    return nn.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal',
        in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis)


def layout_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: Sequence[str],
                 in_axes: Axes, out_axes: Axes, dtype: Any,
                 serving: bool) -> jax.Array | QuantizedWeight:
    """Declares projection weight `name` of checkpoint `shape` (logical `axes`, reading `in_axes`
    and writing `out_axes`), stored in checkpoint or serving order."""
    in_axes, out_axes = _axes(in_axes), _axes(out_axes)
    batch = batch_axes(len(shape), in_axes, out_axes)
    init = weight_init(in_axes, out_axes, batch)
    if not serving:
        return declare(module, name, shape, axes, init, dtype, in_axes=in_axes, out_axes=out_axes)
    order = serving_order(len(shape), in_axes, out_axes)
    num_leading = len(shape) - len(in_axes)
    return declare(
        module, name, tuple(shape[i] for i in order), tuple(axes[i] for i in order),
        lambda key, _, dt: jnp.transpose(init(key, shape, dt), order), dtype,
        in_axes=range(num_leading, len(shape)), out_axes=range(len(batch), num_leading))


def dot(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """jnp.einsum(eqn, x, w) accumulated in float32, returned in x's dtype.

    Asking for a float32 result lets XLA's CPU backend call its bf16 matrix kernels instead of
    converting the whole weight to float32 on every call (measured: 4-13x faster). A product
    with a single row of x is still lowered to the slow conversion, so x is doubled along one
    of its free axes and the copy dropped again (a 2-row product runs ~13x faster than a
    1-row one on the E4B FFN weight).
    """
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    free = [i for i, a in enumerate(x_spec) if a not in w_spec]
    rows = 1
    for i in free:
        rows *= x.shape[i]
    # int8 x int8 products accumulate exactly in int32 (returned as int32).
    accumulate = jnp.int32 if x.dtype == jnp.int8 else jnp.float32
    if rows == 1 and free and x.dtype != jnp.float32:
        axis = free[-1]
        doubled = jnp.concatenate([x, x], axis=axis)
        y = jnp.einsum(eqn, doubled, w, preferred_element_type=accumulate)
        y = jax.lax.slice_in_dim(y, 0, 1, axis=out_spec.index(x_spec[axis]))
    else:
        y = jnp.einsum(eqn, x, w, preferred_element_type=accumulate)
    return y if accumulate == jnp.int32 else y.astype(x.dtype)


def _int8_dot(x: jax.Array, w: QuantizedWeight, x_spec: str, w_spec: str,
              out_spec: str) -> jax.Array:
    """x · (w.q · w.scale) with x quantized too: int8 x int8 products are the only int8 form
    XLA's CPU backend runs fast (a mixed int8 x bf16 product converts the weight every call).

    Each row of x (each combination of its free axes) gets its own absmax scale, so the
    activation rounding is at most half a step of 1/127 of that row's largest value.
    """
    contracted = [i for i, a in enumerate(x_spec) if a in w_spec and a not in out_spec]
    x32 = x.astype(jnp.float32)
    x_scale = jnp.max(jnp.abs(x32), axis=tuple(contracted), keepdims=True) / INT8_MAX
    x_scale = jnp.where(x_scale == 0, 1.0, x_scale)
    xq = jnp.round(x32 / x_scale).astype(jnp.int8)
    y = dot(f'{x_spec},{w_spec}->{out_spec}', xq, w.q).astype(jnp.float32)
    scale_spec = w_spec[:w.scale.ndim]
    y = jnp.einsum(f'{out_spec},{scale_spec}->{out_spec}', y, w.scale.astype(jnp.float32))
    row_spec = ''.join(a for i, a in enumerate(x_spec) if i not in contracted)
    y = jnp.einsum(f'{out_spec},{row_spec}->{out_spec}', y,
                   jnp.squeeze(x_scale, axis=tuple(contracted)))
    return y.astype(x.dtype)


def _merge_contracted(x, w, x_spec: str, w_spec: str, out_spec: str):
    """Flattens several contracted axes into one when both operands hold them contiguously in
    the same order (a free reshape): XLA's CPU matrix kernels take a single contracted axis and
    otherwise copy the weight on every call."""
    contracted = ''.join(a for a in w_spec if a not in out_spec and a in x_spec)
    if len(contracted) < 2 or contracted not in w_spec or contracted not in x_spec:
        return x, w, x_spec, w_spec
    merged = next(c for c in 'ZYXWVUQPO' if c not in x_spec + w_spec + out_spec)

    def flatten(arr, spec):
        start = spec.index(contracted)
        shape = arr.shape[:start] + (-1,) + arr.shape[start + len(contracted):]
        return jnp.reshape(arr, shape), spec.replace(contracted, merged)

    x, x_spec = flatten(x, x_spec)
    if isinstance(w, QuantizedWeight):
        # The scale indexes output channels only: the contracted axes it lacks merge freely.
        q, w_spec = flatten(w.q, w_spec)
        return x, QuantizedWeight(q=q, scale=w.scale), x_spec, w_spec
    w, w_spec = flatten(w, w_spec)
    return x, w, x_spec, w_spec


def contract(eqn: str, x: jax.Array, w: jax.Array | QuantizedWeight,
             order: tuple[int, ...] | None) -> jax.Array:
    """jnp.einsum(eqn, x, w) where eqn names w's checkpoint order and w may be stored in `order`.

    A quantized weight is converted to x's dtype inside the computation and its per-channel
    scale applied to the (smaller) output.
    """
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    if order is not None:
        w_spec = ''.join(w_spec[i] for i in order)
    x, w, x_spec, w_spec = _merge_contracted(x, w, x_spec, w_spec, out_spec)
    # A weight stored [out..., in...] is best the left operand: with the output axes first
    # XLA's CPU backend runs weight @ xᵀ on the weight as stored, where with the token axes
    # first it copies (transposes) the weight on every call. A weight stored [in..., out...]
    # keeps x first (x @ weight), the form the CPU matrix kernels take for it.
    contracted = ''.join(a for a in w_spec if a not in out_spec)
    if w_spec.endswith(contracted):
        weight_first = ''.join(a for a in w_spec if a in out_spec) + ''.join(
            a for a in out_spec if a not in w_spec)
    else:
        weight_first = out_spec
    if isinstance(w, QuantizedWeight):
        y = _int8_dot(x, w, x_spec, w_spec, weight_first)
    else:
        y = dot(f'{x_spec},{w_spec}->{weight_first}', x, w)
    return jnp.transpose(y, [weight_first.index(a) for a in out_spec])


def project(module: nn.Module, name: str, shape: tuple[int, ...], axes: Sequence[str],
            in_axes: Axes, out_axes: Axes, dtype: Any, serving: bool,
            eqn: str, x: jax.Array) -> jax.Array:
    """Declares weight `name` (see `layout_param`) and contracts x with it by `eqn`."""
    w = layout_param(module, name, shape, axes, in_axes, out_axes, dtype, serving)
    order = serving_order(len(shape), _axes(in_axes), _axes(out_axes)) if serving else None
    return contract(eqn, x, w, order)


class Einsum(nn.Module):
    """One projection weight of checkpoint `shape`, contracted with the input by an einsum string.

    `axes` names each axis logically (`gemma3n.layers.axes`); the weight reads `in_axes` and
    writes `out_axes`, any other axis is a batch axis.

    Example:
        >>> proj = Einsum(shape=(8, 4), axes=(EMBED, MLP), in_axes=0, out_axes=1)
        >>> params = proj.init(jax.random.key(0), 'BTD,DF->BTF', jnp.ones((1, 2, 8)))
        >>> # params['w']: [8, 4]; with serving=True it is stored [4, 8].
    """
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    in_axes: Axes
    out_axes: Axes
    weight_name: str = 'w'
    dtype: jnp.dtype = jnp.float32
    serving: bool = False

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return project(self, self.weight_name, self.shape, self.axes, self.in_axes,
                       self.out_axes, self.dtype, self.serving, eqn, x)
