"""Weights applied with `jnp.einsum`, in the checkpoint's axis order or a faster serving order.

Every projection weight is declared with its checkpoint shape and which axes it reads (`in`),
writes (`out`) and batches over. Stored that way it loads checkpoints with no conversion. For
inference it can be re-laid out once into the serving order [batch..., out..., in...] (contracted
axes last), which XLA's CPU backend multiplies many times faster in bfloat16, and optionally
quantized to int8 per output channel (`gemma3n.layout` converts a parameter tree). The einsum
string at each call site always names the checkpoint order; it is rewritten for the stored one.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gemma3n.layers import decode_kernels, int4
from gemma3n.layers.int4 import Int4Weight

Initializer = Callable[..., jax.Array]
Axes = int | Sequence[int]
INT8_MAX = 127

# While a conversion records layouts, every weight declared reports its path and serving order.
_RECORDER: contextvars.ContextVar[dict | None] = contextvars.ContextVar('layout_recorder',
                                                                       default=None)


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


def serving_order(in_axis: Axes, out_axis: Axes, batch_axis: Sequence[int] = ()) -> tuple[int, ...]:
    """The axis permutation from checkpoint order to serving order [batch..., out..., in...]."""
    return tuple(batch_axis) + _axes(out_axis) + _axes(in_axis)


@contextlib.contextmanager
def record_layouts() -> Iterator[dict[tuple[str, ...], tuple[tuple[int, ...], int]]]:
    """Collects {param path: (serving order, number of input axes)} of every weight declared."""
    found: dict[tuple[str, ...], tuple[tuple[int, ...], int]] = {}
    token = _RECORDER.set(found)
    try:
        yield found
    finally:
        _RECORDER.reset(token)


def layout_param(module: nn.Module, name: str, shape: tuple[int, ...], in_axis: Axes,
                 out_axis: Axes, batch_axis: Sequence[int], dtype: Any,
                 serving: bool) -> jax.Array | QuantizedWeight | Int4Weight:
    """Declares weight `name` of checkpoint `shape`, stored in checkpoint or serving order."""
    order = serving_order(in_axis, out_axis, batch_axis)
    found = _RECORDER.get()
    if found is not None:
        found[tuple(module.scope.path) + (name,)] = (order, len(_axes(in_axis)))
    init = weight_init(in_axis, out_axis, batch_axis)
    if not serving:
        return module.param(name, init, shape, dtype)
    stored_shape = tuple(shape[i] for i in order)
    held = module.get_variable('params', name) if module.has_variable('params', name) else None
    if isinstance(held, Int4Weight):
        # Flax checks a held parameter's first leaf against the declared shape; packed int4
        # holds half the values per row, so the check is made here on the value count.
        if 2 * held.q.size != math.prod(stored_shape):
            raise ValueError(f'{name}: int4 weight with {2 * held.q.size} values, declared '
                             f'{stored_shape}.')
        return held
    return module.param(
        name, lambda key, _, dt: jnp.transpose(init(key, shape, dt), order), stored_shape, dtype)


def dot(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """jnp.einsum(eqn, x, w) accumulated in float32, returned in x's dtype (int8 operands: in
    int32). A decode-sized product with a weight stored [out..., in...] runs on our own CPU
    kernels (`gemma3n.layers.decode_kernels`), any other on XLA's (`_xla_dot`)."""
    return decode_kernels.dot(eqn, x, w, _xla_dot)


def _xla_dot(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`dot` by XLA's own products.

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


def _quantize_rows(x: jax.Array, contracted: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """x as int8 with one absmax scale per row (per combination of the axes not `contracted`):
    (int8 values, float32 scales with the contracted axes kept as size 1)."""
    x32 = x.astype(jnp.float32)
    x_scale = jnp.max(jnp.abs(x32), axis=contracted, keepdims=True) / INT8_MAX
    x_scale = jnp.where(x_scale == 0, 1.0, x_scale)
    return jnp.round(x32 / x_scale).astype(jnp.int8), x_scale


def _int4_contract(x: jax.Array, w: Int4Weight, x_spec: str, w_spec: str,
                   out_spec: str) -> jax.Array:
    """x · dequantize(w) with the rows of x in int8 as `_int8_dot` takes them (see
    `gemma3n.layers.int4`); w stored [channels..., in...], no axis shared with x."""
    plan = decode_kernels.row_plan(x_spec, w_spec, out_spec, x.shape, rows_limit=x.size)
    if plan is None:
        raise ValueError(f'an int4 weight {w_spec} cannot be contracted as {x_spec},{w_spec}->'
                         f'{out_spec}: it needs its input axes last and no axis shared with x.')
    x_free, channels, contracted = plan
    xq, x_scale = _quantize_rows(decode_kernels.as_rows(x, x_spec, x_free, contracted), (1,))
    flat = Int4Weight(q=w.q.reshape(-1, w.q.shape[-1]), scale=w.scale.reshape(-1, w.scale.shape[-1]))
    y = int4.rows_dot(xq, flat) * x_scale
    shape = tuple(x.shape[x_spec.index(a)] for a in x_free) + w.q.shape[:-1]
    return decode_kernels.from_rows(y, shape, x_free + channels, out_spec).astype(x.dtype)


def _int8_dot(x: jax.Array, w: QuantizedWeight, x_spec: str, w_spec: str,
              out_spec: str) -> jax.Array:
    """x · (w.q · w.scale) with x quantized too: int8 x int8 products are the only int8 form
    XLA's CPU backend runs fast (a mixed int8 x bf16 product converts the weight every call).

    Each row of x (each combination of its free axes) gets its own absmax scale, so the
    activation rounding is at most half a step of 1/127 of that row's largest value.
    """
    contracted = [i for i, a in enumerate(x_spec) if a in w_spec and a not in out_spec]
    xq, x_scale = _quantize_rows(x, tuple(contracted))
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


def contract(eqn: str, x: jax.Array, w: jax.Array | QuantizedWeight | Int4Weight,
             order: tuple[int, ...] | None) -> jax.Array:
    """jnp.einsum(eqn, x, w) where eqn names w's checkpoint order and w may be stored in `order`.

    A quantized weight is converted to x's dtype inside the computation and its per-channel
    scale applied to the (smaller) output.
    """
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    if order is not None:
        w_spec = ''.join(w_spec[i] for i in order)
    if isinstance(w, Int4Weight):
        return _int4_contract(x, w, x_spec, w_spec, out_spec)
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


def project(module: nn.Module, name: str, shape: tuple[int, ...], in_axis: Axes,
            out_axis: Axes, batch_axis: Sequence[int], dtype: Any, serving: bool,
            eqn: str, x: jax.Array) -> jax.Array:
    """Declares weight `name` (see `layout_param`) and contracts x with it by `eqn`."""
    w = layout_param(module, name, shape, in_axis, out_axis, batch_axis, dtype, serving)
    order = serving_order(in_axis, out_axis, batch_axis) if serving else None
    return contract(eqn, x, w, order)


class Einsum(nn.Module):
    """One projection weight of checkpoint `shape`, contracted with the input by an einsum string.

    Example:
        >>> proj = Einsum(shape=(8, 4), in_axis=0, out_axis=1)
        >>> params = proj.init(jax.random.key(0), 'BTD,DF->BTF', jnp.ones((1, 2, 8)))
        >>> # params['w']: [8, 4]; with serving=True it is stored [4, 8].
    """
    shape: tuple[int, ...]
    in_axis: Axes
    out_axis: Axes
    batch_axis: tuple[int, ...] = ()
    weight_name: str = 'w'
    dtype: jnp.dtype = jnp.float32
    serving: bool = False

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return project(self, self.weight_name, self.shape, self.in_axis, self.out_axis,
                       self.batch_axis, self.dtype, self.serving, eqn, x)
