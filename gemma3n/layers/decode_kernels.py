"""Our own CPU kernels for the products a decode step is made of: a few rows of activations
times a weight stored [out..., in...], read once at the memory's speed (XLA's CPU matrix-vector
products stream well below it). `dot(eqn, x, w, xla_dot)` takes them when they apply and calls
`xla_dot` otherwise, so the numbers are the same either way up to float32 summation order:

- bf16 x bf16 -> float32: products exact, sums in float32 in another order (AVX-512 BF16
  `vdpbf16ps`, AVX2 FMA, or scalar);
- int8 x int8 -> int32: exact, equal to XLA's bit for bit (AVX-512 VNNI, AVX2, scalar).

`gathered_rows(x, ids, w)` is the product of x with rows `ids` of an int8 weight stored rows
first [F, D] (a sparse layer's FFN down projection, `gemma3n.sparse_rows`), read in place:
exact in int32 too, without XLA's gather and its int32 copy of the rows. In bfloat16, for the
units a decode step's tokens keep (`ids`, of which the first `count` are used),
`gathered_dot(x, ids, count, w)` is x times those rows of the up projection and
`gathered_sum(x, ids, count, w)` x times those rows of the down projection, read in place too.
`kept_ids(top, size)` finds those units: jnp.nonzero's ids and their counts, in one pass.

They apply on the CPU backend, with at most `MAX_ROWS` rows of x (decode; a prefill chunk or a
training batch takes the blocked kernel of `gemma3n.layers.gemm`, or XLA's products; on a CPU
with AMX, whose tiles XLA's products use, bf16 and int8 ones take fewer: `max_rows`), and to a
weight whose every axis is either contracted (last, in x's order) or an output axis x lacks.
Under `jit` for another platform the XLA product is lowered instead
(`jax.lax.platform_dependent`).

The C++ source is compiled on first use (`gemma3n.layers.kernel_build`). `$GEMMA3N_KERNELS`
chooses: unset or `auto` the best the CPU has, `avx2` or `scalar` at most that instruction set,
`off` the XLA path; on a CPU with AMX, `avx512` by name also keeps our kernels for products
that `auto` leaves to XLA there (many rows, `gemma3n.layers.gemm.enabled`; bf16 and int8 ones
past a few rows, `max_rows`). It is read when a function is traced, so a cached `jit` keeps its
choice.
If the kernels cannot be built, one line says so and everything runs on the XLA path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.layers.kernel_build import KernelBuildError, build_kernels

ENV = 'GEMMA3N_KERNELS'
OFF_VALUES = ('0', 'off', 'xla')
# Instruction-set codes of the C++ `Isa` enum; a request is capped at what the CPU has.
ISA_CODES = {'auto': 0, 'scalar': 1, 'avx2': 2, 'avx512': 3}
ISA_NAMES = {code: name for name, code in ISA_CODES.items()}
# Rows of x the kernels take at once (the C++ side's kMaxRows).
MAX_ROWS = 16
# On a CPU with AMX, XLA's own products (AMX tiles) beat the bf16 and int8 kernels from a few
# rows on, even with the weights streamed from memory. [32768, 2048] weights, 2.6 GB of them
# cycled, ms a weight ours / XLA (2-core Xeon, 20 GB/s): bf16 4 rows 5.90 / 6.47, 8 rows 8.79 /
# 6.40, 16 rows 14.94 / 6.94; int8 8 rows 3.35 / 3.36, 16 rows 5.04 / 3.69. XLA has no fast int4
# product: that kernel keeps all MAX_ROWS (16 rows: 7.8 ms against XLA's 16.2).
AMX_MAX_ROWS = {'bf16': 4, 'int8': 8}
TARGETS = {'bf16': 'gemma3n_matvec_bf16', 'int8': 'gemma3n_matvec_int8',
           'int4': 'gemma3n_matvec_int4', 'int8_rows': 'gemma3n_rows_int8',
           'bf16_gathered': 'gemma3n_gathered_bf16', 'bf16_rows': 'gemma3n_rows_bf16',
           'int4_to_bf16': 'gemma3n_dequantize_int4_bf16', 'gemm_bf16': 'gemma3n_gemm_bf16',
           'gemm_int4': 'gemma3n_gemm_int4', 'gemm_int8': 'gemma3n_gemm_int8',
           'masked_dot': 'gemma3n_masked_rows_dot', 'masked_sum': 'gemma3n_masked_rows_sum',
           'int4_gathered': 'gemma3n_gathered_int4', 'kept_ids': 'gemma3n_kept_ids',
           'cross_entropy': 'gemma3n_cross_entropy'}
_SYMBOLS = {'bf16': 'Gemma3nMatvecBf16', 'int8': 'Gemma3nMatvecInt8', 'int4': 'Gemma3nMatvecInt4',
            'int8_rows': 'Gemma3nRowsInt8', 'bf16_gathered': 'Gemma3nGatheredBf16',
            'bf16_rows': 'Gemma3nRowsBf16', 'int4_to_bf16': 'Gemma3nDequantizeInt4Bf16',
            'gemm_bf16': 'Gemma3nGemmBf16', 'gemm_int4': 'Gemma3nGemmInt4',
            'gemm_int8': 'Gemma3nGemmInt8',
            'masked_dot': 'Gemma3nMaskedRowsDot', 'masked_sum': 'Gemma3nMaskedRowsSum',
            'int4_gathered': 'Gemma3nGatheredInt4', 'kept_ids': 'Gemma3nKeptIds',
            'cross_entropy': 'Gemma3nCrossEntropy'}

logger = logging.getLogger(__name__)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Builds (or finds) and registers the kernels once per process; None if they cannot be."""
    try:
        library = ctypes.CDLL(str(build_kernels()))
    except (KernelBuildError, OSError) as e:
        logger.warning('gemma3n: decode kernels unavailable (%s); using XLA matrix products.', e)
        return None
    for kind, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(TARGETS[kind], jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform='cpu')
    return library


def requested_isa() -> int | None:
    """The instruction-set code `$GEMMA3N_KERNELS` asks for; None when it turns them off."""
    value = os.environ.get(ENV, 'auto').strip().lower()
    if value in OFF_VALUES:
        return None
    if value not in ISA_CODES:
        raise ValueError(f'${ENV}={value!r}: expected one of {sorted(ISA_CODES)} or "off".')
    return ISA_CODES[value]


def active_isa() -> str | None:
    """The instruction set the kernels run with here ('avx512', 'avx2', 'scalar'), or None when
    they are off, not built, or the default device is not a CPU."""
    requested = requested_isa()
    if requested is None or jax.default_backend() != 'cpu' or _library() is None:
        return None
    best = _library().Gemma3nKernelIsa()
    return ISA_NAMES[best if requested == ISA_CODES['auto'] else min(requested, best)]


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bfloat16 tiles (which XLA's own products use), as the kernels'
    library reads it; False when the library is not built."""
    library = _library()
    return library is not None and _reads_amx(library)


@functools.cache
def _reads_amx(library: ctypes.CDLL) -> bool:
    # Once per library: every traced product asks.
    return bool(library.Gemma3nCpuHasAmx())


def defer_to_amx() -> bool:
    """Whether products that XLA runs faster on AMX tiles go to XLA: the CPU has AMX and
    `$GEMMA3N_KERNELS` does not name avx512."""
    return requested_isa() != ISA_CODES['avx512'] and cpu_has_amx()


def call(kind: str, result: Any, *operands: jax.Array, **attributes: Any) -> Any:
    """The raw kernel `kind` on 2-D operands (see the C++ source for their layouts and
    attributes) -> `result`'s shape (one array, or a tuple)."""
    if _library() is None:
        raise RuntimeError('the decode kernels are not built (see the warning logged above).')
    return jax.ffi.ffi_call(TARGETS[kind], result, vmap_method='sequential')(
        *operands, isa=np.int32(requested_isa() or 0), **attributes)


@jax.custom_jvp
def _bf16_rows(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] · w [N, K]ᵀ -> [M, N] float32, both bfloat16."""
    return call('bf16', jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32), x, w)


@_bf16_rows.defjvp
def _bf16_rows_jvp(primals, tangents):
    # The product is bilinear: its derivative is two products, left to XLA.
    (x, w), (dx, dw) = primals, tangents
    tangent = (jnp.einsum('mk,nk->mn', dx, w, preferred_element_type=jnp.float32)
               + jnp.einsum('mk,nk->mn', x, dw, preferred_element_type=jnp.float32))
    return _bf16_rows(x, w), tangent


def _int8_rows(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] · w [N, K]ᵀ -> [M, N] int32, both int8."""
    return call('int8', jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.int32), x, w)


def _kind(x: jax.Array, w: jax.Array) -> str | None:
    if x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16:
        return 'bf16'
    if x.dtype == jnp.int8 and w.dtype == jnp.int8:
        return 'int8'
    return None


def row_plan(x_spec: str, w_spec: str, out_spec: str, x_shape: tuple[int, ...],
             rows_limit: int = MAX_ROWS, min_rows: int = 1) -> tuple[str, str, str] | None:
    """(x's free axes, w's output axes, the contracted axes) when `x_spec,w_spec->out_spec` is
    a product of `min_rows` to `rows_limit` rows of x with a weight stored [out..., contracted...]
    that has no batch axis; None otherwise."""
    contracted = ''.join(a for a in w_spec if a not in out_spec)
    w_out = w_spec[:len(w_spec) - len(contracted)]
    x_free = ''.join(a for a in x_spec if a not in w_spec)
    if (not contracted or not w_spec.endswith(contracted) or any(a in x_spec for a in w_out)
            or any(a not in x_spec for a in contracted)
            or sorted(out_spec) != sorted(x_free + w_out)):
        return None
    rows = math.prod(x_shape[x_spec.index(a)] for a in x_free)
    return (x_free, w_out, contracted) if min_rows <= rows <= rows_limit else None


def as_rows(x: jax.Array, x_spec: str, x_free: str, contracted: str) -> jax.Array:
    """x -> [rows, contracted size], its free axes first in `x_free` order."""
    moved = jnp.transpose(x, [x_spec.index(a) for a in x_free + contracted])
    rows = math.prod(moved.shape[:len(x_free)])
    return moved.reshape(rows, -1)


def from_rows(y: jax.Array, shape: tuple[int, ...], spec: str, out_spec: str) -> jax.Array:
    """y [rows, N] -> `shape` (axes `spec`, x's free ones then w's output ones), in `out_spec`."""
    return jnp.transpose(y.reshape(shape), [spec.index(a) for a in out_spec])


def max_rows(kind: str) -> int:
    """Rows of x the `kind` ('bf16', 'int8') product kernel takes: `MAX_ROWS`, or on a CPU with
    AMX `AMX_MAX_ROWS` unless `$GEMMA3N_KERNELS` names avx512."""
    return AMX_MAX_ROWS[kind] if defer_to_amx() else MAX_ROWS


def enabled() -> bool:
    """Whether traced products take the kernels (see the module docstring)."""
    return active_isa() is not None


def dot(eqn: str, x: jax.Array, w: jax.Array,
        xla_dot: Callable[[str, jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """xla_dot(eqn, x, w) (bf16 products returned in x's dtype, int8 ones in int32), computed by
    the decode kernels where they apply."""
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    kind = _kind(x, w)
    plan = row_plan(x_spec, w_spec, out_spec, x.shape, max_rows(kind)) if kind else None
    if plan is None or not enabled():
        return xla_dot(eqn, x, w)
    x_free, w_out, contracted = plan

    def kernel(x, w):
        rows = as_rows(x, x_spec, x_free, contracted)
        flat_w = w.reshape(-1, rows.shape[1])
        y = _bf16_rows(rows, flat_w) if kind == 'bf16' else _int8_rows(rows, flat_w)
        shape = tuple(x.shape[x_spec.index(a)] for a in x_free) + w.shape[:len(w_out)]
        y = from_rows(y, shape, x_free + w_out, out_spec)
        return y.astype(x.dtype) if kind == 'bf16' else y

    return jax.lax.platform_dependent(x, w, cpu=kernel,
                                      default=functools.partial(xla_dot, eqn))


def _xla_gathered_rows(x: jax.Array, ids: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum('...c,cd->...d', x, jnp.take(w, ids, axis=0, mode='clip'),
                      preferred_element_type=jnp.int32)


def gathered_rows(x: jax.Array, ids: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., C] int8 times rows `ids` [C] (clipped into range) of w [F, D] int8 -> [..., D]
    int32, exact; on the kernel for at most `MAX_ROWS` rows of x on a CPU."""
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if not 1 <= rows <= MAX_ROWS or not enabled():
        return _xla_gathered_rows(x, ids, w)

    def kernel(x, ids, w):
        flat = x.reshape(rows, x.shape[-1])
        result = jax.ShapeDtypeStruct((rows, w.shape[1]), jnp.int32)
        return call('int8_rows', result, flat, ids.astype(jnp.int32), w).reshape(lead + (-1,))

    return jax.lax.platform_dependent(x, ids, w, cpu=kernel, default=_xla_gathered_rows)


def _used(ids: jax.Array, count: jax.Array) -> jax.Array:
    """[C] bool: the first `count` of `ids`."""
    return jnp.arange(ids.shape[0]) < count


def _xla_gathered_dot(x: jax.Array, ids: jax.Array, count: jax.Array, w: jax.Array) -> jax.Array:
    y = jnp.einsum('mk,ck->mc', x, jnp.take(w, ids, axis=0, mode='clip'),
                   preferred_element_type=jnp.float32)
    return jnp.where(_used(ids, count), y, 0.0)


def _xla_gathered_sum(x: jax.Array, ids: jax.Array, count: jax.Array, w: jax.Array) -> jax.Array:
    x = jnp.where(_used(ids, count), x, jnp.zeros((), x.dtype))
    return jnp.einsum('mc,cd->md', x, jnp.take(w, ids, axis=0, mode='clip'),
                      preferred_element_type=jnp.float32)


def _gathered(kind: str, xla: Callable, out_columns: Callable[[jax.Array], int],
              x: jax.Array, ids: jax.Array, count: jax.Array, w: jax.Array) -> jax.Array:
    """`kind`'s kernel on x [M, ...] (1 <= M <= MAX_ROWS, bfloat16), else `xla`."""
    ids, count = ids.astype(jnp.int32), jnp.asarray(count, jnp.int32)
    if not (1 <= x.shape[0] <= MAX_ROWS and x.dtype == w.dtype == jnp.bfloat16) or not enabled():
        return xla(x, ids, count, w)

    def kernel(x, ids, count, w):
        result = jax.ShapeDtypeStruct((x.shape[0], out_columns(w)), jnp.float32)
        return call(kind, result, x, ids, count, w)

    return jax.lax.platform_dependent(x, ids, count, w, cpu=kernel, default=xla)


def gathered_dot(x: jax.Array, ids: jax.Array, count: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] times rows ids[:count] (clipped into range) of w [F, K] -> [M, C] float32, C =
    len(ids), columns from `count` on 0; bfloat16 operands."""
    return _gathered('bf16_gathered', _xla_gathered_dot, lambda w: ids.shape[0], x, ids, count, w)


def gathered_sum(x: jax.Array, ids: jax.Array, count: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, C] (its first `count` columns) times rows ids[:count] (clipped into range) of w
    [F, D] -> [M, D] float32; bfloat16 operands."""
    return _gathered('bf16_rows', _xla_gathered_sum, lambda w: w.shape[1], x, ids, count, w)


def _xla_kept_ids(top: jax.Array, size: int, any_row: bool) -> tuple[jax.Array, jax.Array]:
    mask = top != 0
    if any_row:
        mask = jnp.any(mask, axis=0, keepdims=True)
    ids = jax.vmap(lambda row: jnp.nonzero(row, size=size, fill_value=0)[0])(mask)
    return ids.astype(jnp.int32), jnp.sum(mask, axis=-1, dtype=jnp.int32)


def kept_ids(top: jax.Array, size: int, any_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """The nonzero units of each row of top [R, F] (`any_row`: of any row, as one row): (ids
    [R or 1, size] int32, in increasing order, the first `size` of them, padded with 0; counts
    [R or 1] int32, all of them, also past `size`), as jnp.nonzero and a sum give them. On a CPU
    with the kernels built, one pass of our kernel: XLA's jnp.nonzero (cumulative sums and a
    scatter) took ~150 us at F = 16384, once per sparse layer in a decode step."""
    groups = 1 if any_row else top.shape[0]
    xla = functools.partial(_xla_kept_ids, size=size, any_row=any_row)
    if top.ndim != 2 or top.dtype not in (jnp.bfloat16, jnp.float32) or not enabled():
        return xla(top)

    def kernel(top):
        result = (jax.ShapeDtypeStruct((groups, size), jnp.int32),
                  jax.ShapeDtypeStruct((groups,), jnp.int32))
        return tuple(call('kept_ids', result, top, any_row=any_row))

    return jax.lax.platform_dependent(top, cpu=kernel, default=xla)
