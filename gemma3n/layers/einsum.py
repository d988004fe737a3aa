"""Projection weights and the one `contract` that applies them, whatever their representation.

Every projection weight is declared with its checkpoint shape and which axes it reads (`in`)
and writes (`out`); any other axis is a batch axis (`gemma3n.layers.weights`). The einsum
string at each call site always names the checkpoint order. How a weight is *stored* is said by
its params leaf, not by a module flag:

- a plain array: the checkpoint order (what `init` creates and checkpoints hold);
- `ServingWeight`: the array re-laid out once into the serving order [batch..., out...,
  in...] (contracted axes last), which XLA's CPU backend multiplies many times faster in
  bfloat16;
- `gemma3n.layers.int8.QuantizedWeight`: int8 in serving order with one scale per output
  channel;
- `StackedWeight`: a weight whose first axis is one leaf per index (the sparse layers' gate and
  up, `gemma3n.sparse_rows`).

`contract(eqn, x, w)` dispatches on the leaf: a `StoredWeight` subclass contracts itself (most
by calling `contract_stored` with their own product), so a new format is one leaf class plus
its converter in `gemma3n.layout` (docs/architecture.md §6). `lookup` reads table rows (the
tied embedding) the same way. `gemma3n.layout` converts a checkpoint-order tree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gemma3n.layers import decode_kernels, gemm
from gemma3n.layers.weights import batch_axes, declare

Initializer = Callable[..., jax.Array]
Axes = int | Sequence[int]
# (eqn over the stored arrays, x, the stored array) -> the product in the eqn's output order.
Product = Callable[[str, jax.Array, jax.Array], jax.Array]
# From this many rows of x on, a training step's products with a frozen serving weight write
# x's axes first (`contract_stored`, `ServingWeight.tokens_first_rows`).
TOKENS_FIRST_ROWS = 512
# The same for the tied unembedding table [V, D], a training loss's head: its products with the
# tokens first overtake the weight-first ones from ~64 rows (AMX Xeon, E4B's [262144, 2048]:
# 0.93 against 0.59 TFLOP/s at 128 rows, 0.97 against 0.55 at 256, 0.67 against 0.63 at 64).
HEAD_TOKENS_FIRST_ROWS = 128


class StoredWeight:
    """Base of the params leaves that store a weight in a representation other than a plain
    checkpoint-order array. A subclass (a `flax.struct.dataclass`) implements:

    - `shape`: the weight's checkpoint-order shape (what the module declares);
    - `contract(eqn, x)`: `jnp.einsum(eqn, x, weight)`, eqn naming the checkpoint order;
    - `take(ids, dtype)`: rows `ids` of a [rows, ...] table, for the embedding lookup;
    - `rows(ids)`: the same kind of leaf holding rows `ids` (any shape of indices) of the first
      *stored* axis, its checkpoint order being that stored order (sparse FFN rows, `gemma3n.
      sparse_rows`);
    - optionally `rows_contract(x, ids)`: x [C] times those rows [C, ...] of a weight stored
      rows first, and `dot_rows(x, ids)`: x [D] times each of those rows [C, D]; `contract` of
      `rows(ids)` unless a format reads them in place.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def contract(self, eqn: str, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def take(self, ids: jax.Array, dtype: Any) -> jax.Array:
        raise NotImplementedError(f'{type(self).__name__} cannot be read row by row.')

    def rows(self, ids: jax.Array) -> StoredWeight:
        raise NotImplementedError(f'{type(self).__name__} cannot be gathered row by row.')

    def rows_contract(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        """x [C] · rows `ids` [C] of this weight stored [F, D] -> [D]."""
        return contract('C,CD->D', x, self.rows(ids))

    def dot_rows(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        """x [D] · each of the rows `ids` [C] of this weight stored [F, D] -> [C]."""
        return contract('D,CD->C', x, self.rows(ids))


def checkpoint_shape(stored_shape: Sequence[int], order: tuple[int, ...] | None
                     ) -> tuple[int, ...]:
    """The checkpoint-order shape of an array stored in `order` (None: unpermuted)."""
    if order is None:
        return tuple(stored_shape)
    shape = [0] * len(order)
    for stored_axis, axis in enumerate(order):
        shape[axis] = stored_shape[stored_axis]
    return tuple(shape)


def rows_first(order: tuple[int, ...] | None) -> None:
    """Raises unless a table stored in `order` keeps its rows (checkpoint axis 0) first."""
    if order is not None and order[0] != 0:
        raise ValueError(f'A table stored in axis order {order} cannot be read by rows.')


@flax.struct.dataclass
class ServingWeight(StoredWeight):
    """A weight stored in serving order: `value` is the checkpoint-order weight transposed by
    `order` (`gemma3n.layers.weights.serving_order`). `tokens_first_rows`: from this many rows
    of x on, products write x's axes first (`contract_stored`); a LoRA step's frozen base sets
    it, serving does not (in a program without a loop, XLA copies every weight for that at its
    start: E4B's prefill at 512 tokens held 1.6 GB of temporaries instead of 0.16)."""
    value: jax.Array
    order: tuple[int, ...] = flax.struct.field(pytree_node=False)
    tokens_first_rows: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        return checkpoint_shape(self.value.shape, self.order)

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    def contract(self, eqn: str, x: jax.Array) -> jax.Array:
        return contract_stored(eqn, x, self.value, self.order, dot, self.tokens_first_rows)

    def take(self, ids: jax.Array, dtype: Any) -> jax.Array:
        rows_first(self.order)
        return jnp.take(self.value, ids, axis=0, mode='clip')

    def rows(self, ids: jax.Array) -> ServingWeight:
        return ServingWeight(jnp.take(self.value, ids, axis=0, mode='clip'), None)


@flax.struct.dataclass
class StackedWeight(StoredWeight):
    """A weight whose first checkpoint axis (a batch axis: the FFN's stacked gate and up) is
    held as one leaf per index, so one of them is read without slicing (a slice of a stacked
    array is a copy on XLA's CPU backend). `parts[i]` is the weight at index i, any leaf."""
    parts: tuple[Any, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts),) + tuple(self.parts[0].shape)

    def contract(self, eqn: str, x: jax.Array) -> jax.Array:
        return contract_parts(eqn, x, len(self.parts),
                              lambda i, part_eqn: contract(part_eqn, x, self.parts[i]))


def contract_parts(eqn: str, x: jax.Array, count: int,
                   contract_part: Callable[[int, str], jax.Array]) -> jax.Array:
    """jnp.einsum(eqn, x, w) of a weight w whose first axis holds `count` independent parts:
    `contract_part(i, part_eqn)` contracts x with part i by eqn without that axis, and the results
    are stacked where eqn's output puts it."""
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    stacked = w_spec[0]
    part_eqn = f'{x_spec},{w_spec[1:]}->{out_spec.replace(stacked, "")}'
    return jnp.stack([contract_part(i, part_eqn) for i in range(count)],
                     axis=out_spec.index(stacked))


def _axes(axes: Axes) -> tuple[int, ...]:
    return (axes,) if isinstance(axes, int) else tuple(axes)


def weight_init(in_axis: Axes, out_axis: Axes, batch_axis: Sequence[int] = ()) -> Initializer:
    """Fan-in scaled normal init, so each projection roughly preserves the RMS of its input."""
    return nn.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal',
        in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis)


def projection_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: Sequence[str],
                     in_axes: Axes, out_axes: Axes, dtype: Any) -> jax.Array | StoredWeight:
    """Declares projection weight `name` of checkpoint `shape` (logical `axes`, reading `in_axes`
    and writing `out_axes`); returns the params leaf, in whatever representation it is stored."""
    in_axes, out_axes = _axes(in_axes), _axes(out_axes)
    init = weight_init(in_axes, out_axes, batch_axes(len(shape), in_axes, out_axes))
    return declare(module, name, shape, axes, init, dtype, in_axes=in_axes, out_axes=out_axes)


def dot(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """jnp.einsum(eqn, x, w) accumulated in float32, returned in x's dtype (int8 operands: in
    int32). On a CPU, a product with a weight stored [out..., in...] runs on our own kernels
    where they apply: many rows in bfloat16 on `gemma3n.layers.gemm`, a decode step's few on
    `gemma3n.layers.decode_kernels`; any other on XLA's (`_xla_dot`)."""
    return gemm.dot(eqn, x, w, _few_rows_dot)


def _few_rows_dot(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
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
    elif x.dtype == w.dtype == jnp.bfloat16 and _transposable(x_spec, w_spec, out_spec):
        return _bf16_dot(eqn, x, w)
    else:
        y = jnp.einsum(eqn, x, w, preferred_element_type=accumulate)
    return y if accumulate == jnp.int32 else y.astype(x.dtype)


def _transposable(x_spec: str, w_spec: str, out_spec: str) -> bool:
    """Whether each operand's axes are named by the other two specs (no axis summed away
    inside one operand), so that both backward products are einsums of the same letters."""
    return (all(a in w_spec or a in out_spec for a in x_spec)
            and all(a in x_spec or a in out_spec for a in w_spec))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bf16_dot(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """bfloat16 einsum accumulated in float32, returned in bfloat16, whose backward products
    are bfloat16 x bfloat16 as well.

    Differentiated as a plain einsum, the backward multiplies the float32 cotangent by the
    bfloat16 weight: XLA's CPU backend converts the whole weight to float32 for it (slow
    kernels), and schedules those conversions, which depend on the weights alone, early: a
    training step then holds a float32 copy of every weight (measured: twice the frozen base
    of a LoRA step). The cotangent of a bfloat16 output holds bfloat16 values, so taking it as
    bfloat16 loses nothing.
    """
    return jnp.einsum(eqn, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _bf16_dot_fwd(eqn, x, w):
    # Each operand is kept only for the other's gradient: a frozen weight's input is not.
    residuals = (x.value if w.perturbed else None, w.value if x.perturbed else None)
    return _bf16_dot(eqn, x.value, w.value), residuals


def _bf16_dot_bwd(eqn, residuals, g):
    x, w = residuals
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    dx = None if w is None else jnp.einsum(f'{out_spec},{w_spec}->{x_spec}', g, w,
                                           preferred_element_type=jnp.float32)
    dw = None if x is None else jnp.einsum(f'{x_spec},{out_spec}->{w_spec}', x, g,
                                           preferred_element_type=jnp.float32)
    return tuple(None if d is None else d.astype(jnp.bfloat16) for d in (dx, dw))


_bf16_dot.defvjp(_bf16_dot_fwd, _bf16_dot_bwd, symbolic_zeros=True)


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
    w, w_spec = flatten(w, w_spec)
    return x, w, x_spec, w_spec


def contract_stored(eqn: str, x: jax.Array, w: jax.Array, order: tuple[int, ...] | None,
                    product: Product, tokens_first_rows: int | None = None) -> jax.Array:
    """jnp.einsum(eqn, x, ·) of an array `w` stored in `order` (None: the checkpoint order that
    eqn names), computed by `product` on the stored array in the form XLA's CPU backend runs
    fastest. Per-output-channel data a product carries (scales) keeps its axes: only the
    contracted axes, which come last in serving order, are merged. From `tokens_first_rows`
    rows of x on (None: never), the product writes x's axes first (see below)."""
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    if order is not None:
        w_spec = ''.join(w_spec[i] for i in order)
    x, w, x_spec, w_spec = _merge_contracted(x, w, x_spec, w_spec, out_spec)
    # A weight stored [out..., in...] is best the left operand for a few rows of x: with the
    # output axes first XLA's CPU backend runs weight @ xᵀ on the weight as stored, where with
    # the token axes first it copies (transposes) the weight on every call. From a few hundred
    # rows on (a training batch) that copy is paid off and x @ weightᵀ, which writes
    # [rows, out] as the next product reads it, runs faster (AMX Xeon, [512, 2048] by E4B's
    # [16384, 2048] gate: 0.98 against 0.58 TFLOP/s; at 128 rows 1.06 against 1.25).
    # A weight stored [in..., out...] keeps x first (x @ weight), the form the CPU matrix
    # kernels take for it.
    contracted = ''.join(a for a in w_spec if a not in out_spec)
    if tokens_first_rows is not None and tokens_first_rows <= math.prod(
            x.shape[i] for i, a in enumerate(x_spec) if a not in w_spec):
        return _tokens_first(x_spec, w_spec, out_spec, x, w, product)
    if w_spec.endswith(contracted):
        order_out = ''.join(a for a in w_spec if a in out_spec) + ''.join(
            a for a in out_spec if a not in w_spec)
    else:
        order_out = out_spec
    y = product(f'{x_spec},{w_spec}->{order_out}', x, w)
    return jnp.transpose(y, [order_out.index(a) for a in out_spec])


def _tokens_first(x_spec: str, w_spec: str, out_spec: str, x: jax.Array, w: jax.Array,
                  product: Product) -> jax.Array:
    """x @ weightᵀ with the weight's several output axes (the FFN's stacked gate and up, [C, F])
    flattened into one: given a weight with two output axes, XLA's CPU backend transposes it on
    every call (AMX Xeon, [512, 2048] by [2, 16384, 2048]: 0.47 TFLOP/s, against 1.22 for the
    same weight as [32768, 2048]). Only plain products come here (a scale per output channel
    would need the same flattening)."""
    w_out = ''.join(a for a in w_spec if a in out_spec and a not in x_spec)
    x_out = ''.join(a for a in x_spec if a in out_spec)
    if len(w_out) > 1 and w_out in w_spec:
        merged = next(c for c in 'ZYXWVUQPO' if c not in x_spec + w_spec + out_spec)
        start = w_spec.index(w_out)
        flat = jnp.reshape(w, w.shape[:start] + (-1,) + w.shape[start + len(w_out):])
        y = product(f'{x_spec},{w_spec.replace(w_out, merged)}->{x_out}{merged}', x, flat)
        y = jnp.reshape(y, y.shape[:-1] + w.shape[start:start + len(w_out)])
    else:
        y = product(f'{x_spec},{w_spec}->{x_out}{w_out}', x, w)
    return jnp.transpose(y, [(x_out + w_out).index(a) for a in out_spec])


def contract(eqn: str, x: jax.Array, w: jax.Array | StoredWeight) -> jax.Array:
    """jnp.einsum(eqn, x, w) accumulated in float32, in x's dtype; eqn names w's checkpoint
    order and `w` is any params leaf: a plain array or a `StoredWeight`."""
    if isinstance(w, StoredWeight):
        return w.contract(eqn, x)
    return contract_stored(eqn, x, w, None, dot)


def lookup(table: jax.Array | StoredWeight, ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows `ids` of a [rows, ...] table leaf (ids outside the table clamp). A plain or
    re-laid-out table gives its stored values; an encoded one (int8) decodes into `dtype`."""
    if isinstance(table, StoredWeight):
        return table.take(ids, dtype)
    return jnp.take(table, ids, axis=0, mode='clip')


def project(module: nn.Module, name: str, shape: tuple[int, ...], axes: Sequence[str],
            in_axes: Axes, out_axes: Axes, dtype: Any, eqn: str, x: jax.Array) -> jax.Array:
    """Declares weight `name` (see `projection_param`) and contracts x with it by `eqn`."""
    return contract(eqn, x, projection_param(module, name, shape, axes, in_axes, out_axes, dtype))


class Einsum(nn.Module):
    """One projection weight of checkpoint `shape`, contracted with the input by an einsum string.

    `axes` names each axis logically (`gemma3n.layers.axes`); the weight reads `in_axes` and
    writes `out_axes`, any other axis is a batch axis.

    Example:
        >>> proj = Einsum(shape=(8, 4), axes=(EMBED, MLP), in_axes=0, out_axes=1)
        >>> params = proj.init(jax.random.key(0), 'BTD,DF->BTF', jnp.ones((1, 2, 8)))
        >>> # params['w']: [8, 4]; `gemma3n.layout` may replace it by a ServingWeight [4, 8].
    """
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    in_axes: Axes
    out_axes: Axes
    weight_name: str = 'w'
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return project(self, self.weight_name, self.shape, self.axes, self.in_axes,
                       self.out_axes, self.dtype, eqn, x)
