"""int8 weights with one float32 scale per output channel: the leaf type and its converter.

Quantizing a projection halves the bytes a decode step reads. XLA's CPU backend runs int8 fast
only as int8 x int8 products, so the activations are quantized too, per row, at run time. All
int8 logic is here: the leaf (`QuantizedWeight`: its contraction and its row lookup for the
tied embedding) and the converter (`quantize`, `quantize_in_chunks`) that `gemma3n.layout`
calls while loading.

Example:
    >>> w = quantize(jnp.asarray([[1.0, -2.0, 0.5]]), num_leading=1)   # [out=1, in=3]
    >>> contract('BI,OI->BO', x, w)             # x · (w.q · w.scale), int8 x int8 inside
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from gemma3n.layers import decode_kernels, gemm
from gemma3n.layers.einsum import StoredWeight, checkpoint_shape, contract_stored, dot, rows_first

INT8_MAX = 127
# Values quantized per compiled call when converting a weight: XLA's CPU backend computes
# bfloat16 in float32 and materialises the converted input, so converting the E4B embedding in
# one call would hold a 2 GB float32 copy of it; chunks of rows bound that to 64 MB.
QUANTIZE_CHUNK = 1 << 24


@flax.struct.dataclass
class QuantizedWeight(StoredWeight):
    """A weight stored as int8 with one float32 scale per output channel.

    q: int8 weight in serving order [batch..., out..., in...] (`order` permutes the checkpoint's
        axes into it; None: the checkpoint order already is).
    scale: float32 [batch..., out...]; the weight is q · scale.
    scale_last: the scale covers the last stored axes instead of the first: a weight stored
        [in, out] (rows first; the sparse layers' FFN down projection, `gemma3n.sparse_rows`).
    """
    q: jax.Array
    scale: jax.Array
    order: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)
    scale_last: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return checkpoint_shape(self.q.shape, self.order)

    def contract(self, eqn: str, x: jax.Array) -> jax.Array:
        return contract_stored(eqn, x, self.q, self.order,
                               lambda spec, x, q: _trainable_int8_dot(spec, x, q, self.scale,
                                                                      self.scale_last))

    def take(self, ids: jax.Array, dtype: Any) -> jax.Array:
        rows_first(self.order)
        rows = jnp.take(self.q, ids, axis=0, mode='clip').astype(jnp.float32)
        scales = jnp.take(self.scale, ids, axis=0, mode='clip')
        return (rows * scales[..., None]).astype(dtype)

    def rows_contract(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        if not self.scale_last or self.order != (0, 1):
            return super().rows_contract(x, ids)
        # Read in place (`decode_kernels.gathered_rows`): the same int32 sums as the product of
        # the gathered rows, scaled the same way.
        return _int8_dot('C,CD->D', x, self.q, self.scale, scale_last=True,
                         product=lambda eqn, xq, q: decode_kernels.gathered_rows(xq, ids, q))

    def rows(self, ids: jax.Array) -> QuantizedWeight:
        # A scale over the last axis belongs to every row; one over the first is gathered.
        scale = self.scale if self.scale_last else jnp.take(self.scale, ids, axis=0, mode='clip')
        return QuantizedWeight(jnp.take(self.q, ids, axis=0, mode='clip'), scale, None,
                               self.scale_last)


def quantize_rows(x: jax.Array, contracted: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """x as int8 with one absmax scale per row (per combination of the axes not `contracted`):
    (int8 values, float32 scales with the contracted axes kept as size 1)."""
    x32 = x.astype(jnp.float32)
    x_scale = jnp.max(jnp.abs(x32), axis=contracted, keepdims=True) / INT8_MAX
    x_scale = jnp.where(x_scale == 0, 1.0, x_scale)
    return jnp.round(x32 / x_scale).astype(jnp.int8), x_scale


def _int8_dot(eqn: str, x: jax.Array, q: jax.Array, scale: jax.Array,
              scale_last: bool = False, product: Any = dot) -> jax.Array:
    """x · (q · scale) with x quantized too: int8 x int8 products are the only int8 form XLA's
    CPU backend runs fast (a mixed int8 x bf16 product converts the weight every call).
    `product(eqn, xq, q)` computes the int8 product (default: `einsum.dot`).

    Each row of x (each combination of its free axes) gets its own absmax scale, so the
    activation rounding is at most half a step of 1/127 of that row's largest value.
    """
    if product is dot and not scale_last:
        y = _many_rows_dot(eqn, x, q, scale)
        if y is not None:
            return y
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    contracted = [i for i, a in enumerate(x_spec) if a in w_spec and a not in out_spec]
    xq, x_scale = quantize_rows(x, tuple(contracted))
    y = product(eqn, xq, q).astype(jnp.float32)
    scale_spec = _scale_spec(w_spec, out_spec, scale.ndim, scale_last)
    y = jnp.einsum(f'{out_spec},{scale_spec}->{out_spec}', y, scale.astype(jnp.float32))
    row_spec = ''.join(a for i, a in enumerate(x_spec) if i not in contracted)
    y = jnp.einsum(f'{out_spec},{row_spec}->{out_spec}', y,
                   jnp.squeeze(x_scale, axis=tuple(contracted)))
    return y.astype(x.dtype)


def _many_rows_dot(eqn: str, x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array | None:
    """`_int8_dot` of a prefill chunk on our many-row kernel (`kernels/gemm_quantized.h`): more
    rows of x than the decode kernels take, w stored [out..., in...] with a scale per output,
    x in bfloat16 or float32, where `gemm.int8_enabled()`; None otherwise. The kernel sums
    the same integer products in float32 (equal to XLA's int32 sums while they stay below 2^24) and
    scales them as `_int8_dot` does, in one pass: XLA's int8 product and its two scalings took
    1.2-1.5x as long at E4B's FFN shapes and 128-512 rows (Zen 4, one process)."""
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    plan = decode_kernels.row_plan(x_spec, w_spec, out_spec, x.shape, rows_limit=x.size,
                                   min_rows=decode_kernels.MAX_ROWS + 1)
    if (plan is None or x.dtype not in (jnp.bfloat16, jnp.float32)
            or scale.ndim != len(plan[1]) or not gemm.int8_enabled()):
        return None
    x_free, w_out, contracted = plan
    rows = decode_kernels.as_rows(x, x_spec, x_free, contracted)
    xq, x_scale = quantize_rows(rows, (1,))
    channels = q.shape[:len(w_out)]
    result = jax.ShapeDtypeStruct((rows.shape[0], math.prod(channels)), x.dtype)
    y = jax.ffi.ffi_call(decode_kernels.TARGETS['gemm_int8'], result)(
        xq.astype(jnp.bfloat16), x_scale, q.reshape(-1, rows.shape[1]),
        scale.reshape(-1).astype(jnp.float32))
    shape = tuple(x.shape[x_spec.index(a)] for a in x_free) + channels
    return decode_kernels.from_rows(y, shape, x_free + w_out, out_spec)


def _scale_spec(w_spec: str, out_spec: str, scale_ndim: int, scale_last: bool) -> str:
    """The einsum letters of a weight's scale: the first (or, `scale_last`, the last) of the
    weight's axes the output keeps; an axis it shares with x (rows gathered per sequence) is
    one of those."""
    kept = ''.join(a for a in w_spec if a in out_spec)
    return kept[len(kept) - scale_ndim:] if scale_last else kept[:scale_ndim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _trainable_int8_dot(eqn: str, x: jax.Array, q: jax.Array, scale: jax.Array,
                        scale_last: bool) -> jax.Array:
    """`_int8_dot` differentiable in x by the straight-through rule: the rounding of x to
    int8 counts as the identity, so dx = dy · (q · scale), the gradient of the product with
    the dequantized weight. (Differentiated as written, the rounding has zero derivative: no
    gradient would reach the layers before, nor their LoRA adapters.) The weight is frozen:
    q and its scale get none."""
    return _int8_dot(eqn, x, q, scale, scale_last)


def _trainable_int8_dot_fwd(eqn, x, q, scale, scale_last):
    # The residuals are the frozen weight's own buffers: no copy is kept.
    return _int8_dot(eqn, x, q, scale, scale_last), (q, scale)


def _trainable_int8_dot_bwd(eqn, scale_last, residuals, g):
    q, scale = residuals
    # The output is in x's dtype (the compute dtype), so is its cotangent.
    x_dtype = g.dtype
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    scale_spec = _scale_spec(w_spec, out_spec, scale.ndim, scale_last)
    # dy · (q · scale) as (dy · scale) · q: the scale goes on the cotangent, not on a float
    # copy of the weight; q converts exactly (|q| <= 127) into the compute dtype, whose
    # products the matrix kernels run (`dot`). The barrier ties the conversion, which reads
    # the weight alone, to dy (measured on a busy machine: a 4-layer FFN's gradient 2.6 s
    # against 4.2 s without it); XLA still keeps the converted copies alive together
    # (bench/README.md, "LoRA over an int8 base").
    g = jnp.einsum(f'{out_spec},{scale_spec}->{out_spec}', g.astype(jnp.float32),
                   scale.astype(jnp.float32)).astype(x_dtype)
    g, q = jax.lax.optimization_barrier((g, q))
    dx = dot(f'{out_spec},{w_spec}->{x_spec}', g, q.astype(x_dtype))
    return dx, None, None


_trainable_int8_dot.defvjp(_trainable_int8_dot_fwd, _trainable_int8_dot_bwd)


def quantize(w: jax.Array, num_leading: int, order: tuple[int, ...] | None = None
             ) -> QuantizedWeight:
    """Symmetric int8 per output channel; w in serving order (reached from the checkpoint's by
    `order`), its first `num_leading` axes (batch and output) index the channels."""
    w32 = jnp.asarray(w, jnp.float32)
    reduce_axes = tuple(range(num_leading, w32.ndim))
    scale = jnp.max(jnp.abs(w32), axis=reduce_axes) / INT8_MAX
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.round(w32 / jnp.expand_dims(scale, reduce_axes)).astype(jnp.int8)
    return QuantizedWeight(q=q, scale=scale, order=order)


_quantize_rows = jax.jit(functools.partial(quantize, num_leading=1))


def by_row_chunks(fn: Any, rows: jax.Array) -> list[Any]:
    """fn applied to [channels, inputs] `rows` QUANTIZE_CHUNK values at a time."""
    step = max(1, QUANTIZE_CHUNK // rows.shape[1])
    return [fn(rows[start:start + step]) for start in range(0, rows.shape[0], step)]


def quantize_in_chunks(w: jax.Array, num_leading: int, order: tuple[int, ...] | None = None
                       ) -> QuantizedWeight:
    """`quantize(w, num_leading, order)`, a chunk of output channels at a time (bounded
    temporaries for the largest weights)."""
    channels = w.shape[:num_leading]
    parts = by_row_chunks(_quantize_rows, w.reshape(math.prod(channels), -1))
    return QuantizedWeight(q=jnp.concatenate([p.q for p in parts]).reshape(w.shape),
                           scale=jnp.concatenate([p.scale for p in parts]).reshape(channels),
                           order=order)
