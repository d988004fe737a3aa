"""int4 weights: groups of `INT4_GROUP` values along the contracted axes share one float16
scale (llama.cpp's Q4_0 rule: the value of largest magnitude in a group maps to -8 exactly).
The leaf type (`Int4Weight`) and its converter (`quantize_int4_in_chunks`, called by
`gemma3n.layout` while loading).

A weight in serving order [channels..., in...] is stored with its input axes flattened to K,
two values per byte. Products take the activation rows quantized to int8 (as the int8 weights
do, `gemma3n.layers.int8`), so every product of an activation, a 4-bit value and its scale is
exact in float32 (8 + 4 + 11 significant bits): our decode kernel (per-group sums in int32) and
the XLA path (the weight dequantized to float32 a block of rows at a time) differ only in
summation order. A prefill chunk (more rows than the decode kernel takes) multiplies the
dequantized values rounded to bfloat16 (`PREFILL_DTYPE`): on our many-row kernel where it runs
(AVX-512 BF16, `scaled_rows_dot`), which dequantizes while packing the weight; on XLA
elsewhere.

Example:
    >>> w4 = quantize_int4(w, num_leading=1)          # w: [N, K], K a multiple of 32
    >>> contract('BK,NK->BN', x, w4)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.layers import decode_kernels, gemm
from gemma3n.layers.einsum import StoredWeight, checkpoint_shape, rows_first
from gemma3n.layers.int8 import by_row_chunks, quantize_rows

INT4_GROUP = 32
# Stored nibbles are value + INT4_OFFSET, values in [INT4_MIN, INT4_MAX].
INT4_OFFSET = 8
INT4_MIN, INT4_MAX = -8, 7
_HALF = INT4_GROUP // 2
_LOW_NIBBLE = 0x0F
# Float32 bytes of weight rows the XLA path dequantizes at a time: they stay in the cache.
DEQUANTIZE_BLOCK_BYTES = 1 << 20
BFLOAT16_BLOCKS = 4
# A product of more rows than the kernel takes (a prefill chunk) is computed on XLA in this
# dtype: bfloat16 rounds each dequantized value by at most 2^-9 of itself (an int4 step is
# 1/8 of a group's largest value), and XLA multiplies it 1.6x faster than in float32.
PREFILL_DTYPE = jnp.bfloat16


@flax.struct.dataclass
class Int4Weight(StoredWeight):
    """A weight in int4 groups.

    q: uint8 [channels..., K / 2]; in each group of INT4_GROUP values (INT4_GROUP / 2 bytes),
       byte j holds value j + INT4_OFFSET in its low nibble and value j + INT4_GROUP / 2 in its
       high one (the layout the decode kernel unpacks with two instructions).
    scale: float16 [channels..., K / INT4_GROUP].
    order: the permutation from the checkpoint's axes to the serving order (None: the same).
    serving_shape: the weight's shape in serving order (K is the product of its input axes).
    """
    q: jax.Array
    scale: jax.Array
    order: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)
    serving_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

    @property
    def shape(self) -> tuple[int, ...]:
        return checkpoint_shape(self.serving_shape, self.order)

    def contract(self, eqn: str, x: jax.Array) -> jax.Array:
        inputs, out_spec = eqn.split('->')
        x_spec, w_spec = inputs.split(',')
        if self.order is not None:
            w_spec = ''.join(w_spec[i] for i in self.order)
        plan = decode_kernels.row_plan(x_spec, w_spec, out_spec, x.shape, rows_limit=x.size)
        if plan is None:
            raise ValueError(f'An int4 weight cannot be contracted as {x_spec},{w_spec}->'
                             f'{out_spec}: it needs its input axes last, none shared with x.')
        x_free, channels, contracted = plan
        y = _trainable_rows_dot(decode_kernels.as_rows(x, x_spec, x_free, contracted),
                                self.q.reshape(-1, self.q.shape[-1]),
                                self.scale.reshape(-1, self.scale.shape[-1]))
        shape = tuple(x.shape[x_spec.index(a)] for a in x_free) + self.q.shape[:-1]
        return decode_kernels.from_rows(y, shape, x_free + channels, out_spec)

    def rows(self, ids: jax.Array) -> Int4Weight:
        # The first stored axis is an output channel: its groups run along the inputs.
        return Int4Weight(q=jnp.take(self.q, ids, axis=0, mode='clip'),
                          scale=jnp.take(self.scale, ids, axis=0, mode='clip'), order=None,
                          serving_shape=tuple(jnp.shape(ids)) + tuple(self.serving_shape[1:]))

    def dot_rows(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        if self.q.ndim != 2:
            return super().dot_rows(x, ids)
        # `contract` of the gathered rows, as its forward computes it, the rows read in place.
        xq, x_scale = quantize_rows(x[None], (1,))
        return (gathered_rows_dot(xq, ids, self.q, self.scale) * x_scale).astype(x.dtype)[0]

    def take(self, ids: jax.Array, dtype: Any) -> jax.Array:
        rows_first(self.order)
        rows = dequantize(jnp.take(self.q, ids, axis=0, mode='clip'),
                          jnp.take(self.scale, ids, axis=0, mode='clip'))
        return rows.reshape(ids.shape + tuple(self.serving_shape[1:])).astype(dtype)


def fits_int4(contracted_size: int) -> bool:
    """Whether a weight whose input axes hold `contracted_size` values can be stored in int4."""
    return contracted_size % INT4_GROUP == 0


def quantize_int4(w: jax.Array, num_leading: int, order: tuple[int, ...] | None = None
                  ) -> Int4Weight:
    """w in serving order (reached from the checkpoint's by `order`), its first `num_leading`
    axes the channels, the rest flattened to K."""
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
    nibbles = (jnp.clip(jnp.round(groups / step), INT4_MIN, INT4_MAX) + INT4_OFFSET
               ).astype(jnp.uint8)
    packed = nibbles[..., :_HALF] | (nibbles[..., _HALF:] << 4)
    return Int4Weight(q=packed.reshape(channels + (k // 2,)), scale=scale[..., 0], order=order,
                      serving_shape=tuple(w.shape))


_quantize_rows = jax.jit(functools.partial(quantize_int4, num_leading=1))


def quantize_int4_in_chunks(w: jax.Array, num_leading: int,
                            order: tuple[int, ...] | None = None) -> Int4Weight:
    """`quantize_int4(w, num_leading, order)`, a chunk of channels at a time (bounded
    temporaries for the largest weights)."""
    channels = w.shape[:num_leading]
    parts = by_row_chunks(_quantize_rows, w.reshape(math.prod(channels), -1))
    return Int4Weight(
        q=jnp.concatenate([p.q for p in parts]).reshape(channels + parts[0].q.shape[1:]),
        scale=jnp.concatenate([p.scale for p in parts]).reshape(channels + parts[0].scale.shape[1:]),
        order=order, serving_shape=tuple(w.shape))


def _halves(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32
            ) -> tuple[jax.Array, jax.Array]:
    """Packed values [..., K / 2] and their scales [..., K / 32] -> the first and the second
    half of every group, each [..., K / 32, 16]: each value times its scale (exact in float32),
    in `dtype`."""
    nibbles = q.reshape(q.shape[:-1] + (-1, _HALF))
    step = scale[..., None].astype(jnp.float32)
    return tuple(((values.astype(jnp.float32) - INT4_OFFSET) * step).astype(dtype)
                 for values in (nibbles & _LOW_NIBBLE, nibbles >> 4))


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """Packed values [..., K / 2] and their scales [..., K / 32] -> float32 [..., K] (each
    value times its scale: exact in float32)."""
    return jnp.concatenate(_halves(q, scale), axis=-1).reshape(q.shape[:-1] + (-1,))


def _xla_rows_dot(xq: jax.Array, q: jax.Array, scale: jax.Array,
                  dtype: Any = jnp.float32) -> jax.Array:
    """`rows_dot` on XLA: the weight dequantized a block of rows (DEQUANTIZE_BLOCK_BYTES of
    float32) at a time, so no copy of the whole weight is written and read back on each call.
    In float32 every product is exact, as the kernel's; in bfloat16 (`PREFILL_DTYPE`) the
    dequantized values are rounded to it.

    The low and the high nibbles of each group are two contractions (x's first and second
    half-groups), not one unpacked array: interleaving them back took XLA longer than the
    product (measured at 128 x 2048 by 16384, quiet, 2 cores: 192 ms before, 141 ms now in
    float32, 90 ms in bfloat16 with 4x larger blocks; a plain bfloat16 product takes 65 ms).
    In bfloat16 on a CPU with the decode kernels built, our kernel dequantizes each block
    (`int4_to_bf16`, the same values in natural order): XLA's own dequantization took 4-5x
    longer than the product on a CPU whose products use AMX."""
    m, n, groups = xq.shape[0], q.shape[0], scale.shape[1]
    x = xq.astype(dtype).reshape(m, groups, 2, _HALF)
    r = _block_rows(n, xq.shape[1], dtype)
    full = n // r * r

    def halves_block(q, scale):                           # [r, ...] -> [M, r]
        low, high = _halves(q, scale, dtype)
        return sum(jnp.einsum('mgk,ngk->mn', x[:, :, half], w, preferred_element_type=jnp.float32)
                   for half, w in enumerate((low, high)))

    def kernel_block(q, scale):
        # The same bfloat16 values, dequantized by our kernel in natural order.
        w = decode_kernels.call('int4_to_bf16', jax.ShapeDtypeStruct(
            (q.shape[0], 2 * q.shape[1]), jnp.bfloat16), q, scale)
        return jnp.einsum('mk,nk->mn', x.reshape(m, -1), w, preferred_element_type=jnp.float32)

    def block(q, scale):
        if dtype != jnp.bfloat16 or scale.dtype != jnp.float16 or not decode_kernels.enabled():
            return halves_block(q, scale)
        return jax.lax.platform_dependent(q, scale, cpu=kernel_block, default=halves_block)

    y = jax.lax.map(lambda b: block(*b), (q[:full].reshape(n // r, r, -1),
                                          scale[:full].reshape(n // r, r, -1)))
    y = jnp.transpose(y, (1, 0, 2)).reshape(m, full)       # [M, full]
    if full < n:
        y = jnp.concatenate([y, block(q[full:], scale[full:])], axis=1)
    return y


def scaled_rows_dot(xq: jax.Array, x_scale: jax.Array, q: jax.Array, scale: jax.Array,
                    dtype: Any) -> jax.Array:
    """`rows_dot(xq, q, scale)` times each row's scale x_scale [M, 1], in `dtype`. A prefill
    chunk takes our many-row kernel where `gemm.enabled()` (`kernels/gemm_quantized.h`): the
    same bfloat16 weight values as XLA's path (dequantized once per call, while the kernel packs
    the weight), float32 sums in another order, scaled and rounded once in the kernel. XLA's
    path (dequantized blocks, its product, then the scaling) took 1.3-1.9x as long at E4B's FFN
    shapes and 128-512 rows (Zen 4, one process).

    On a CPU with AMX (`gemm.on_amx()`) the kernel multiplies on the tiles, the weight's rows
    dequantized block by block as their left operand (`kernels/gemm_amx_rows.h`); XLA's path
    took, ms, alternated in one process on a 2-core Xeon (128 / 512 rows): FFN gate and up
    [32768, 2048] 30.6 / 96.4 against 19.7 / 77.7, down [2048, 16384] 16.5 / 42.3 against 9.5 /
    39.2, attention [2048, 2048] 2.8 / 5.1 against 1.4 / 4.7."""
    # The kernel multiplies the values rounded to bfloat16: it stands for XLA's path only when
    # that path does too (`PREFILL_DTYPE`, which a test may set to float32).
    if (xq.shape[0] > decode_kernels.MAX_ROWS and scale.dtype == jnp.float16
            and PREFILL_DTYPE == jnp.bfloat16
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float32) and gemm.enabled()):
        result = jax.ShapeDtypeStruct((xq.shape[0], q.shape[0]), dtype)
        return jax.ffi.ffi_call(decode_kernels.TARGETS['gemm_int4'], result)(
            xq.astype(jnp.bfloat16), x_scale.astype(jnp.float32), q, scale,
            amx=np.int32(gemm.on_amx()))
    return (rows_dot(xq, q, scale) * x_scale).astype(dtype)


@jax.custom_vjp
def _trainable_rows_dot(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """Rows x [M, K] (any float dtype) times the int4 weight -> [M, N] in x's dtype, x
    quantized to int8 per row (`scaled_rows_dot`); differentiable in x by the straight-through
    rule, as the int8 weights are (`gemma3n.layers.int8`): dx = dy · the dequantized weight.
    The weight is frozen: q and its scales get no gradient."""
    xq, x_scale = quantize_rows(x, (1,))
    return scaled_rows_dot(xq, x_scale, q, scale, x.dtype)


def _trainable_rows_dot_fwd(x, q, scale):
    # The residuals are the frozen weight's own buffers, and x's dtype (as a 0-size array).
    return _trainable_rows_dot(x, q, scale), (q, scale, jnp.zeros((0,), x.dtype))


def _trainable_rows_dot_bwd(residuals, g):
    q, scale, like_x = residuals
    n = q.shape[0]
    r = _block_rows(n, q.shape[1] * 2)
    full = n // r * r

    def block(dx, part):                    # dx [M, K] += dy [M, r] · dequantized [r, K]
        g_block, q_block, scale_block = part
        return dx + jnp.einsum('mr,rk->mk', g_block, dequantize(q_block, scale_block),
                               preferred_element_type=jnp.float32), None

    # A block of rows dequantized at a time, as in the forward (`_xla_rows_dot`): never a
    # float32 copy of the whole weight.
    g = g.astype(jnp.float32)
    g_blocks = jnp.transpose(g[:, :full].reshape(g.shape[0], n // r, r), (1, 0, 2))
    dx = jnp.zeros((g.shape[0], q.shape[1] * 2), jnp.float32)
    dx, _ = jax.lax.scan(block, dx, (g_blocks, q[:full].reshape(n // r, r, -1),
                                     scale[:full].reshape(n // r, r, -1)))
    if full < n:
        dx, _ = block(dx, (g[:, full:], q[full:], scale[full:]))
    return dx.astype(like_x.dtype), None, None


_trainable_rows_dot.defvjp(_trainable_rows_dot_fwd, _trainable_rows_dot_bwd)


def _block_rows(n: int, k: int, dtype: Any = jnp.float32) -> int:
    """Weight rows of K values dequantized at a time (1 to n): DEQUANTIZE_BLOCK_BYTES of
    float32, and BFLOAT16_BLOCKS times as many rows in bfloat16 (the best of 1-16 MB blocks
    measured for each)."""
    rows = DEQUANTIZE_BLOCK_BYTES // (np.dtype(np.float32).itemsize * k)
    if dtype == jnp.bfloat16:
        rows *= BFLOAT16_BLOCKS
    return max(1, min(n, rows))


def rows_dot(xq: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """int8 rows xq [M, K] times the int4 weight (q [N, K / 2], scale [N, K / 32]) -> [M, N]
    float32, on the decode kernel for up to `decode_kernels.MAX_ROWS` rows on a CPU (with the
    stored float16 scales: a differentiated scale, in float32, stays on XLA)."""
    if xq.shape[0] > decode_kernels.MAX_ROWS:
        return _xla_rows_dot(xq, q, scale, PREFILL_DTYPE)
    if scale.dtype != jnp.float16 or not decode_kernels.enabled():
        return _xla_rows_dot(xq, q, scale)

    def kernel(xq, q, scale):
        result = jax.ShapeDtypeStruct((xq.shape[0], q.shape[0]), jnp.float32)
        return decode_kernels.call('int4', result, xq, q, scale)

    return jax.lax.platform_dependent(xq, q, scale, cpu=kernel, default=_xla_rows_dot)


def gathered_rows_dot(xq: jax.Array, ids: jax.Array, q: jax.Array, scale: jax.Array
                      ) -> jax.Array:
    """int8 rows xq [M, K] times rows `ids` [C] (clipped into range) of the int4 weight (q
    [F, K / 2], scale [F, K / 32]) -> [M, C] float32: `rows_dot` of the gathered rows, which the
    decode kernel reads in place, the same sums in the same order. For the kept units of E4B's
    sparse layers this saved XLA's gathers of the rows and their scales: 1.1-2.4 ms of a
    ~102 ms int4 decode step (the two steps alternated in one process, medians of 40 and 120
    pairs; Zen 4)."""
    def gathered(xq, ids, q, scale):
        return rows_dot(xq, jnp.take(q, ids, axis=0, mode='clip'),
                        jnp.take(scale, ids, axis=0, mode='clip'))

    if (not 1 <= xq.shape[0] <= decode_kernels.MAX_ROWS or scale.dtype != jnp.float16
            or not decode_kernels.enabled()):
        return gathered(xq, ids, q, scale)

    def kernel(xq, ids, q, scale):
        result = jax.ShapeDtypeStruct((xq.shape[0], ids.shape[0]), jnp.float32)
        return decode_kernels.call('int4_gathered', result, xq, ids.astype(jnp.int32), q, scale)

    return jax.lax.platform_dependent(xq, ids, q, scale, cpu=kernel, default=gathered)
