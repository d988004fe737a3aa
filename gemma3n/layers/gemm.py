"""Our own CPU kernel for bfloat16 products of many rows: a prefill chunk or a training batch
times a projection weight (`kernels/gemm_bf16.h`, AVX-512 BF16; on AMX tiles
`kernels/gemm_amx.h`). XLA's CPU products run these at ~300 GFLOP/s on a 2-core Zen 4 whose
`vdpbf16ps` peak is ~450 (torch: ~400); the kernel packs blocks of both operands the way that
instruction reads them and runs near the peak (up to 256 rows it reads a serving weight in
place instead, `kernels/gemm_few_rows.h`).

`dot(eqn, x, w, fallback)` takes the kernel when all of these hold, and calls `fallback`
otherwise:

- x and w are bfloat16, with at least `MIN_ROWS` rows of x (x's axes that w lacks), or, with
  w in the serving order, more rows than the decode kernels take (`MIN_ROWS_IN_PLACE`);
- w has no batch axis and holds its contracted axes together, last ([out..., in...], the
  serving order) or first ([in..., out...], the checkpoint order);
- the kernels are on (`$GEMMA3N_KERNELS`, `gemma3n.layers.decode_kernels`), the CPU has AVX-512
  BF16, and the process has one device: a custom call in a program partitioned over several
  devices would be computed whole on each;
- on a CPU with AMX (unless `$GEMMA3N_KERNELS=avx512` asks for the AVX-512 kernel by name): K a
  multiple of `AMX_K_MULTIPLE` or below it, and with w [N, K] `AMX_MIN_ROWS_TRANSPOSED` rows.
  There the kernel multiplies on AMX tiles (`kernels/gemm_amx.h`), since the AVX-512 one ran
  3-7x slower than XLA's products, which use the tiles (~200 GFLOP/s against 1.0-1.5 TFLOP/s); a
  product contracting fewer values (a LoRA factor's rank) takes the AVX-512 one, which beats
  XLA's there. The tiles ran, against XLA's, on a 2-core Xeon (TFLOP/s, E4B's shapes): 256 rows
  by the [262144, 2048] unembedding 0.95 / 0.85 and its backward 1.10 / 0.50; 512 rows by the
  FFN gate and up [32768, 2048] 0.99 / 1.00 (backward 1.05 / 1.02), by the down [2048, 16384]
  1.32 / 1.25 (backward 1.16 / 0.76), by a [2048, 2048] attention weight 1.39 / 1.60 (backward
  1.13 / 0.96). A LoRA step at E4B widths (10 layers, 1 x 512) took 5.2-5.3 s against 6.2-6.3 on
  XLA's products.

The decision is made when the function is traced (not with `jax.lax.platform_dependent`: its
other branch's backward residuals, zeros the size of the weight, would be made too).

The product is differentiable, its gradients the kernel again: in x dy · w, in w dyᵀ · x (at 512
rows, E4B's shapes: 3-15x XLA's einsum for a LoRA factor, 1.5-2.7x for a whole weight); each
operand is kept for the backward only when the other one needs it. Sums are float32, as XLA's,
in another order (the bound the tests state); the kernel rounds the result to bfloat16, as `dot`
does.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.layers import decode_kernels

TARGET = 'gemma3n_gemm_bf16'
# The C++ side's WeightLayout: w [N, K] (y = x · wᵀ) or w [K, N] (y = x · w).
WEIGHT_ROWS, WEIGHT_COLUMNS = 0, 1
# From this many rows of x on the kernel beats XLA's products. Measured on a Zen 4, E4B's FFN
# and attention shapes, best of two medians: at 48 rows 1.3-1.5x faster, at 32 rows even or up
# to 1.2x slower (at so few rows both are bound by reading the weight, which the kernel also
# packs), at 128 rows 1.25-1.45x faster. Below it, the decode kernels or XLA's.
MIN_ROWS = 48
# A serving weight is read in place up to 256 rows (`kernels/gemm_few_rows.h`), and that beats
# XLA's products from the first row count the decode kernels leave to them: at 17-40 rows
# 1.4-2.1x on E4B's FFN shapes and 1.1-2.0x on its attention ones (Zen 4, one process); the
# decode kernels are faster up to 16 rows.
MIN_ROWS_IN_PLACE = decode_kernels.MAX_ROWS + 1


# On a CPU with AMX the kernel multiplies on AMX tiles (`kernels/gemm_amx.h`), K a multiple of
# AMX_K_MULTIPLE (a tile step). Other products go to XLA's, which use AMX tiles too, except
# those contracting fewer values than a step (by a LoRA factor's rank), which the AVX-512 kernel
# takes: bound by writing their result, they ran 2-7x faster there than on XLA's ([512, 16] by
# [16, 16384]: 1.9 against 12.4 ms; by [16, 2048]: 0.33 against 0.63).
AMX_K_MULTIPLE = 32
# A weight stored [N, K] is packed for the tiles by 16 x 16 transposes, which at a prefill
# chunk's rows cost about as much as the product: at 128 rows the tiles ran E4B's FFN gate and
# down [N, K] at 0.83-0.91 TFLOP/s against XLA's 1.03-1.22, at 512 rows 0.99-1.47 against
# 1.00-1.25. So products with such a weight take the tiles from this many rows on (a training
# batch; the loss's 256-row chunks by the unembedding, 0.95 against 0.85).
AMX_MIN_ROWS_TRANSPOSED = 256


def available() -> bool:
    """Whether the kernels of many rows can run here: the kernels on and built, a CPU with
    AVX-512 BF16, one device."""
    return decode_kernels.active_isa() == 'avx512' and jax.device_count() == 1


def enabled() -> bool:
    """Whether traced products of many rows take the kernel (see the module docstring)."""
    return available()


def int8_enabled() -> bool:
    """Whether int8 products of many rows take the AVX-512 kernel (`kernels/gemm_quantized.h`):
    where `enabled()`, but not on AMX, where XLA's int8 products run on the tiles' int8 form:
    3-7x faster than that kernel, and 1.5-2x faster than our bf16 tiles on the int8 values (E4B's
    FFN and attention shapes at 128 and 512 rows, one process)."""
    return enabled() and not on_amx()


def on_amx() -> bool:
    """Whether the kernel multiplies on AMX tiles: the CPU has them and `$GEMMA3N_KERNELS`
    does not name avx512 (which keeps the AVX-512 kernel, as the tests ask)."""
    return decode_kernels.defer_to_amx()


def product(a: jax.Array, w: jax.Array, layout: int) -> jax.Array:
    """a [M, K] · w ([N, K] transposed, or [K, N]) -> [M, N], float32 sums rounded to
    bfloat16, on the kernel: only where `enabled()`."""
    n = w.shape[0] if layout == WEIGHT_ROWS else w.shape[1]
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((a.shape[0], n), jnp.bfloat16))(
        a, w, layout=np.int32(layout), amx=np.int32(on_amx()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, layout: int) -> jax.Array:
    """x [M, K] · w (as `layout`) -> [M, N]; all bfloat16 (`product`)."""
    return product(x, w, layout)


def weight_gradient(g: jax.Array, x: jax.Array, layout: int) -> jax.Array:
    """The gradient in w of x [M, K] · w -> g [M, N]: gᵀ · x [N, K] (WEIGHT_ROWS) or xᵀ · g
    [K, N], on the kernel, whose left operand is a transposed copy.

    Computed the other way round and transposed when that copies fewer values: a LoRA
    factor a [K, r] takes (gᵀ · x)ᵀ, a copy of g [M, r] and of the [r, K] result rather than
    of x [M, K].
    """
    m, n, k = g.shape[0], g.shape[1], x.shape[1]
    left, right = (g, x) if layout == WEIGHT_ROWS else (x, g)
    direct_copies = m * left.shape[1]
    flipped_copies = m * right.shape[1] + n * k
    if direct_copies <= flipped_copies:
        return product(left.T, right, WEIGHT_COLUMNS)
    return product(right.T, left, WEIGHT_COLUMNS).T


def _matmul_fwd(x, w, layout):
    # Each operand is kept only for the other's gradient: a frozen weight's input is not.
    residuals = (x.value if w.perturbed else None, w.value if x.perturbed else None)
    return matmul(x.value, w.value, layout), residuals


def _matmul_bwd(layout, residuals, g):
    x, w = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    # The kernel's result is bfloat16, so its cotangent holds bfloat16 values (a float32 one
    # arrives where a caller upcast the product): nothing is lost taking it so.
    g = g.astype(jnp.bfloat16)
    dx = None if w is None else matmul(g, w, WEIGHT_COLUMNS if layout == WEIGHT_ROWS
                                       else WEIGHT_ROWS)
    dw = None if x is None else weight_gradient(g, x, layout)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd, symbolic_zeros=True)


def _plan(x_spec: str, w_spec: str, out_spec: str, x_shape: tuple[int, ...]
          ) -> tuple[str, str, str, int] | None:
    """(x's free axes, w's output axes, the contracted axes, the layout) when the kernel can
    compute `x_spec,w_spec->out_spec` for an x of `x_shape`; None otherwise."""
    contracted = ''.join(a for a in w_spec if a not in out_spec)
    if w_spec.endswith(contracted):
        layout, w_out = WEIGHT_ROWS, w_spec[:len(w_spec) - len(contracted)]
    elif w_spec.startswith(contracted):
        layout, w_out = WEIGHT_COLUMNS, w_spec[len(contracted):]
    else:
        return None
    plan = decode_kernels.row_plan(
        x_spec, w_out + contracted, out_spec, x_shape, rows_limit=math.prod(x_shape),
        min_rows=MIN_ROWS_IN_PLACE if layout == WEIGHT_ROWS else MIN_ROWS)
    return None if plan is None else (plan[0], w_out, contracted, layout)


def _size(x: jax.Array, x_spec: str, axes: str) -> int:
    return math.prod(x.shape[x_spec.index(a)] for a in axes)


def dot(eqn: str, x: jax.Array, w: jax.Array,
        fallback: Callable[[str, jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """jnp.einsum(eqn, x, w) summed in float32 and returned in bfloat16, on the kernel where
    it applies (see the module docstring); `fallback(eqn, x, w)` otherwise."""
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    plan = None
    if x.dtype == w.dtype == jnp.bfloat16:
        plan = _plan(x_spec, w_spec, out_spec, x.shape)
    if plan is None or not enabled():
        return fallback(eqn, x, w)
    x_free, w_out, contracted, layout = plan
    k = _size(x, x_spec, contracted)
    if on_amx() and (k % AMX_K_MULTIPLE and k > AMX_K_MULTIPLE or layout == WEIGHT_ROWS
                     and _size(x, x_spec, x_free) < AMX_MIN_ROWS_TRANSPOSED):
        return fallback(eqn, x, w)
    rows = decode_kernels.as_rows(x, x_spec, x_free, contracted)
    out_shape = tuple(w.shape[w_spec.index(a)] for a in w_out)
    if layout == WEIGHT_ROWS:
        flat_w = w.reshape(-1, rows.shape[1])
    else:
        flat_w = w.reshape(rows.shape[1], -1)
    y = matmul(rows, flat_w, layout)
    shape = tuple(x.shape[x_spec.index(a)] for a in x_free) + out_shape
    return decode_kernels.from_rows(y, shape, x_free + w_out, out_spec)
