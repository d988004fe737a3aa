"""Our many-row bf16 product kernel (gemma3n.layers.gemm) against exact float32 products and
against XLA's: odd sizes in every blocking dimension, both weight layouts, int4 and int8
weights converted while packed, its gradients, which products take it, and a LoRA step of a bfloat16
model with the kernel and without."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n.layers import contract, decode_kernels, gemm, int4, int8
from gemma3n.layers.einsum import _xla_dot, dot
from hf_oracle import small_configs
from lora_kernel_check import check_lora_step_with_and_without_kernels

F32_EPS = 2.0 ** -24        # float32 unit roundoff
BF16_EPS = 2.0 ** -8        # bfloat16 unit roundoff (7 stored mantissa bits)
# (M, K, N) off the kernel's blocks (gemm_bf16.h: tiles of 8 rows x 48 columns, blocks of 192
# rows, 384 contracted values, 768 columns, 16-pair transposes while packing; up to 256 rows of
# x and K even, w [N, K] takes gemm_few_rows.h): K odd (a half pair) and past one block, K under
# one transpose, M past one row block and not whole tiles, N past one column block and not whole
# panels; N under 2 x 384 columns, so that the threads split the rows instead (70 rows: neither
# half whole tiles).
SHAPES = [(1, 1, 1), (13, 7, 33), (200, 771, 800), (70, 5, 100), (9, 1000, 1537),
          (64, 32, 48), (33, 2048, 97)]

pytestmark = pytest.mark.skipif(not gemm.available(),
                                reason='the kernel needs AVX-512 BF16 and the kernels built')


@pytest.fixture(autouse=True)
def kernel_by_name(monkeypatch):
    # By name, so that a CPU with AMX (where 'auto' leaves these products to XLA) tests it too.
    monkeypatch.setenv(decode_kernels.ENV, 'avx512')


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16),
            jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16))


def _exact_and_magnitude(x, w):
    """x [M, K] · w [N, K]ᵀ in float64 (exact for these sizes), and Σ|x·w| per output."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return x64 @ w64.T, np.abs(x64) @ np.abs(w64).T


def _summation_bound(k, magnitude):
    """Float32 sums of K exact products in any order are within (K - 1)·eps·Σ|x·w| of the
    exact sum (vdpbf16ps adds a pair's two products one after the other, each rounded)."""
    return 2 * max(k - 1, 1) * F32_EPS * magnitude


def _to_bf16(values):
    """float64 -> float32 -> bfloat16, each to nearest: monotone, as each rounding is."""
    return np.asarray(jnp.asarray(np.asarray(values, np.float32), jnp.bfloat16), np.float64)


def _assert_rounded_sums(got, exact, bound):
    """got is the bfloat16 rounding of a float32 sum within `bound` of `exact`: rounding is
    monotone, so it lies between the roundings of the interval's ends."""
    got = np.asarray(got, np.float64)
    assert np.all(_to_bf16(exact - bound) <= got) and np.all(got <= _to_bf16(exact + bound))


@pytest.mark.parametrize('m,k,n', SHAPES)
@pytest.mark.parametrize('layout', [gemm.WEIGHT_ROWS, gemm.WEIGHT_COLUMNS])
def test_kernel_equals_rounded_exact_products_within_summation_noise(m, k, n, layout):
    x, w = _operands(m, k, n)
    operand = w if layout == gemm.WEIGHT_ROWS else w.T
    got = jax.jit(gemm.product, static_argnums=2)(x, operand, layout)
    exact, magnitude = _exact_and_magnitude(x, w)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    _assert_rounded_sums(got, exact, _summation_bound(k, magnitude))


# (M, K, N) of the few-rows path (w [N, K], M <= 256, K even; gemm_few_rows.h: panels of 64 rows
# of x, tiles of 6 weight rows, blocks of 768 weight rows and 384 contracted values): one row, a
# last panel of 1-3 vectors, K past one block and under one transpose, N not whole tiles and
# past a block per thread, and N under 2 x 96 rows, where the threads split x's panels.
FEW_ROWS_SHAPES = [(1, 2, 1), (17, 1000, 1601), (100, 770, 800), (256, 64, 1543), (130, 2, 50)]


@pytest.mark.parametrize('m,k,n', FEW_ROWS_SHAPES)
def test_few_rows_path_equals_the_many_row_path_bit_for_bit(m, k, n):
    """Both paths sum the same pairs in the same order, block by block: x · w[N, K]ᵀ (few rows,
    w read in place) and x · w[K, N] (the many-row kernel, w packed) give the same bits."""
    x, w = _operands(m, k, n)
    product = jax.jit(gemm.product, static_argnums=2)
    in_place, packed = product(x, w, gemm.WEIGHT_ROWS), product(x, w.T, gemm.WEIGHT_COLUMNS)
    np.testing.assert_array_equal(np.asarray(in_place).view(np.uint16),
                                  np.asarray(packed).view(np.uint16))


# (M, K, N) of int4 products (kernels/gemm_quantized.h, K a multiple of 32): one group, K past one
# block of 384 and not whole blocks, M past a row block (192) and not whole tiles, N not whole
# panels (48) and past a column block (768); N under 2 x 384, where the threads split the rows.
INT4_SHAPES = [(17, 32, 50), (200, 800, 800), (33, 2048, 97), (70, 416, 1601)]


def _int4_operands(m, k, n):
    rng = np.random.default_rng(5)
    w4 = int4.quantize_int4(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), 1)
    xq = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
    return xq, jnp.asarray(rng.uniform(0.5, 2.0, (m, 1)), jnp.float32), w4


_scaled_rows_dot = jax.jit(int4.scaled_rows_dot, static_argnums=4)


@pytest.mark.parametrize('m,k,n', INT4_SHAPES)
def test_int4_product_is_the_bf16_product_of_its_dequantized_weight_bit_for_bit(m, k, n):
    """Rows scaled by 1: the int4 kernel packs the bfloat16 values XLA's path multiplies
    (`int4.dequantize` rounded to bfloat16) and sums them as the bf16 kernel does."""
    xq, _, w4 = _int4_operands(m, k, n)
    got = _scaled_rows_dot(xq, jnp.ones((m, 1), jnp.float32), w4.q, w4.scale, jnp.bfloat16)
    w = int4.dequantize(w4.q, w4.scale).astype(jnp.bfloat16)
    want = jax.jit(gemm.product, static_argnums=2)(xq.astype(jnp.bfloat16), w.T,
                                                    gemm.WEIGHT_COLUMNS)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  np.asarray(want).view(np.uint16))


@pytest.mark.parametrize('m,k,n', INT4_SHAPES)
def test_int4_product_scales_each_row_then_rounds_once(m, k, n):
    xq, x_scale, w4 = _int4_operands(m, k, n)
    lowered = jax.jit(int4.scaled_rows_dot, static_argnums=4).lower(
        xq, x_scale, w4.q, w4.scale, jnp.float32).as_text()
    assert decode_kernels.TARGETS['gemm_int4'] in lowered
    w = int4.dequantize(w4.q, w4.scale).astype(jnp.bfloat16)
    exact, magnitude = _exact_and_magnitude(xq, w)
    s = np.asarray(x_scale, np.float64)
    # The float32 sum within the summation bound, then one float32 product with the row's scale.
    bound = (_summation_bound(k, magnitude) + F32_EPS * (np.abs(exact) + magnitude)) * s
    got = np.asarray(_scaled_rows_dot(xq, x_scale, w4.q, w4.scale, jnp.float32), np.float64)
    assert np.all(np.abs(got - exact * s) <= bound)
    _assert_rounded_sums(_scaled_rows_dot(xq, x_scale, w4.q, w4.scale, jnp.bfloat16),
                         exact * s, bound)


# (eqn, x shape, w shape in checkpoint order, its serving order) of int8 products with more rows
# than the decode kernels take (kernels/gemm_quantized.h): K odd and past one block of 384,
# rows past a row block (192) and not whole tiles, N not whole panels (48) and past a column
# block (768), N under 2 x 384 (the threads split the rows); two output axes (a scale [N, H]);
# a weight stored [in, out] in the checkpoint, [out, in] in serving order.
INT8_FORMS = [('BTD,FD->BTF', (1, 17, 33), (50, 33), (0, 1)),
              ('BTD,FD->BTF', (2, 100, 801), (800, 801), (0, 1)),
              ('BTD,DF->BTF', (1, 70, 417), (417, 1601), (1, 0)),
              ('BTD,DNH->BTNH', (3, 11, 2048), (2048, 4, 24), (1, 2, 0))]


@pytest.mark.parametrize('eqn,x_shape,w_shape,order', INT8_FORMS)
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_int8_product_equals_xlas_int32_path_bit_for_bit(monkeypatch, eqn, x_shape, w_shape,
                                                         order, dtype):
    """Products of int8 values are integers below 2^14, so while every partial sum stays
    below 2^24 (checked: Σ|xq|·|q| is), the kernel's float32 sums equal XLA's int32 ones; both
    then multiply by the weight's and the row's scales in the same order and round once."""
    rng = np.random.default_rng(9)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    # One input axis, last in serving order: the others are the channels.
    leaf = int8.quantize(jnp.transpose(w, order), len(w_shape) - 1, order)
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)

    def product():     # a new function each time: jit would reuse a trace of the same one
        f = jax.jit(lambda x: contract(eqn, x, leaf))
        return f(x), decode_kernels.TARGETS['gemm_int8'] in f.lower(x).as_text()

    got, on_kernel = product()
    monkeypatch.setenv(decode_kernels.ENV, 'avx2')
    want, on_kernel_capped = product()
    assert on_kernel and not on_kernel_capped
    assert got.dtype == want.dtype == dtype
    k = x_shape[-1]
    xq, _ = int8.quantize_rows(x.reshape(-1, k), (1,))
    q = np.asarray(leaf.q, np.int64).reshape(-1, k)
    assert (np.abs(np.asarray(xq, np.int64)) @ np.abs(q).T).max() < 2 ** 24
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# (M, N, K) of weight gradients: a LoRA factor's (a rank of 4: computed transposed), a wide
# weight's (computed directly), odd sizes and more rows than one block of k.
GRADIENT_SHAPES = [(70, 4, 300), (70, 300, 4), (401, 97, 130), (33, 1, 1)]


@pytest.mark.parametrize('m,n,k', GRADIENT_SHAPES)
@pytest.mark.parametrize('layout', [gemm.WEIGHT_ROWS, gemm.WEIGHT_COLUMNS])
def test_weight_gradient_equals_rounded_exact_products(m, n, k, layout):
    g, x = _operands(m, n, k, seed=3)[0], _operands(m, k, 1, seed=4)[0]
    got = jax.jit(gemm.weight_gradient, static_argnums=2)(g, x, layout)
    exact, magnitude = _exact_and_magnitude(g.T, x.T)                       # gᵀ · x [N, K]
    if layout == gemm.WEIGHT_COLUMNS:
        exact, magnitude = exact.T, magnitude.T
    assert got.shape == exact.shape and got.dtype == jnp.bfloat16
    _assert_rounded_sums(got, exact, _summation_bound(m, magnitude))


# (eqn, x shape, w shape): serving order [out..., in...] and checkpoint order [in..., out...],
# several contracted and output axes (the attention projections).
FORMS = [('BTD,FD->BTF', (2, 40, 130), (333, 130)), ('BTD,DF->BTF', (3, 40, 130), (130, 97)),
         ('BTNH,DNH->BTD', (1, 100, 4, 33), (50, 4, 33)),
         ('BTD,KNHD->KBTNH', (1, 70, 64), (2, 3, 5, 64)),
         ('BTNH,NHD->BTD', (1, 100, 4, 33), (4, 33, 50))]


def _weighted_sum(product):
    """A scalar of the product whose cotangent is not uniform: 1 + (index mod 7)."""
    def f(x, w):
        y = product(x, w).astype(jnp.float32)
        return jnp.sum(y * (1 + jnp.arange(y.size).reshape(y.shape) % 7))
    return f


@pytest.mark.parametrize('eqn,x_shape,w_shape', FORMS)
def test_products_and_gradients_equal_xla_within_rounding(eqn, x_shape, w_shape):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.bfloat16)
    ours = jax.jit(jax.value_and_grad(_weighted_sum(lambda x, w: dot(eqn, x, w)), (0, 1)))
    xla = jax.jit(jax.value_and_grad(_weighted_sum(lambda x, w: _xla_dot(eqn, x, w)), (0, 1)))
    # y = x·w, dx = dy·w and dw = dyᵀ·x
    assert ours.lower(x, w).as_text().count(gemm.TARGET) == 3
    (value, grads), (want_value, want_grads) = ours(x, w), xla(x, w)
    # Each side rounds float32 sums to bfloat16: the two may differ by one rounding of each
    # (the float32 order differs far less), in the products and in the gradients.
    assert abs(float(value) - float(want_value)) <= 4 * BF16_EPS * abs(float(want_value))
    for got, want in zip(grads, want_grads):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.all(np.abs(got - want) <= 2 * BF16_EPS * np.maximum(np.abs(got), np.abs(want)))


def test_products_the_kernel_does_not_take(monkeypatch):
    x, w = _operands(gemm.MIN_ROWS, 64, 96)

    def calls(eqn, x, w):
        return jax.jit(lambda x, w: dot(eqn, x, w)).lower(x, w).as_text().count(gemm.TARGET)

    assert calls('md,fd->mf', x, w) == 1
    assert calls('md,df->mf', x, w.T) == 1
    assert calls('md,df->mf', x[:-1], w.T) == 0                 # fewer rows than MIN_ROWS
    few = gemm.MIN_ROWS_IN_PLACE
    assert calls('md,fd->mf', x[:few], w) == 1                  # a serving weight, read in place
    assert calls('md,fd->mf', x[:few - 1], w) == 0              # the decode kernels' rows
    assert calls('md,fd->mf', x.astype(jnp.float32), w.astype(jnp.float32)) == 0
    assert calls('md,md->m', x, x) == 0                         # a batch axis
    monkeypatch.setenv(decode_kernels.ENV, 'off')
    assert calls('md,fd->mf', x, w) == 0
    monkeypatch.setenv(decode_kernels.ENV, 'avx2')              # the kernel is AVX-512 only
    assert calls('md,fd->mf', x, w) == 0


@pytest.mark.parametrize('amx', [False, True])
def test_with_amx_the_kernel_takes_products_of_whole_tiles_on_them(monkeypatch, amx):
    # On AMX (unless avx512 is named) the kernel multiplies on tiles, K whole steps of 32 and a
    # weight [N, K] by a training batch's rows; other products go to XLA's, on AMX tiles too,
    # but for those contracting fewer than 32 values (a LoRA rank), which the kernel keeps.
    monkeypatch.setattr(decode_kernels, 'cpu_has_amx', lambda: amx)
    assert gemm.enabled() and not gemm.on_amx()                 # avx512 by name
    monkeypatch.setenv(decode_kernels.ENV, 'auto')
    assert gemm.enabled() and gemm.on_amx() is amx
    assert gemm.int8_enabled() is not amx                       # int8: XLA's on AMX

    def lowered(m, k, n, eqn='md,fd->mf'):
        x, w = _operands(m, k, n)
        w = w if eqn == 'md,fd->mf' else w.T
        return jax.jit(lambda x, w: dot(eqn, x, w)).lower(x, w).as_text()
    rows = gemm.AMX_MIN_ROWS_TRANSPOSED
    assert gemm.TARGET in lowered(rows, 64, 48)
    assert ('amx = 1' in lowered(rows, 64, 48)) is amx
    assert ('amx = 1' in lowered(gemm.MIN_ROWS, 64, 48, 'md,df->mf')) is amx
    assert (gemm.TARGET in lowered(rows - 1, 64, 48)) is not amx
    assert (gemm.TARGET in lowered(rows, 48, 48)) is not amx
    assert gemm.TARGET in lowered(gemm.MIN_ROWS, 16, 48, 'md,df->mf')
    xq, x_scale, w4 = _int4_operands(decode_kernels.MAX_ROWS + 1, 64, 48)   # int4: any rows
    int4_lowered = jax.jit(lambda *a: int4.scaled_rows_dot(*a, jnp.bfloat16)).lower(
        xq, x_scale, w4.q, w4.scale).as_text()              # a new function: a new trace
    assert decode_kernels.TARGETS['gemm_int4'] in int4_lowered
    assert ('amx = 1' in int4_lowered) is amx


# (M, K, N) on AMX tiles (kernels/gemm_amx.h: K whole steps of 32, blocks of 384 contracted
# values, 384 columns and 512 rows, rows in groups of 32): the fewest rows (one tile, padded to
# a group), rows not whole groups, K past one block and not whole blocks, N not whole tiles or
# panels and past a column block per thread, rows past a block, and N under 2 x 384, where the
# threads split the rows.
AMX_SHAPES = [(16, 32, 1), (33, 64, 17), (100, 1152, 800), (70, 2048, 1601), (600, 64, 800),
              (200, 96, 100)]


@pytest.mark.skipif(not decode_kernels.cpu_has_amx(), reason='the CPU has no AMX tiles')
@pytest.mark.parametrize('m,k,n', AMX_SHAPES)
@pytest.mark.parametrize('layout', [gemm.WEIGHT_ROWS, gemm.WEIGHT_COLUMNS])
def test_amx_tiles_equal_rounded_exact_products_within_summation_noise(monkeypatch, m, k, n,
                                                                         layout):
    monkeypatch.setenv(decode_kernels.ENV, 'auto')
    test_kernel_equals_rounded_exact_products_within_summation_noise(m, k, n, layout)


# (M, K, N) of int4 products on AMX tiles (kernels/gemm_amx_rows.h: w's rows 32 at a time, a's
# rows in blocks of 128, K in blocks of 2048): rows under one group of 32, rows past a block and
# not whole groups, K past a block (sums kept between blocks), N not whole groups, and N of one
# group, so that one thread has none.
AMX_INT4_SHAPES = [(17, 32, 50), (200, 800, 800), (33, 4160, 97), (300, 2048, 32)]


@pytest.mark.skipif(not decode_kernels.cpu_has_amx(), reason='the CPU has no AMX tiles')
@pytest.mark.parametrize('m,k,n', AMX_INT4_SHAPES)
def test_int4_on_amx_tiles_is_the_bf16_product_of_its_dequantized_weight(monkeypatch, m, k, n):
    monkeypatch.setenv(decode_kernels.ENV, 'auto')
    jax.clear_caches()              # traces of the same shapes made for the AVX-512 kernel
    xq, x_scale, w4 = _int4_operands(m, k, n)
    assert 'amx = 1' in _scaled_rows_dot.lower(xq, x_scale, w4.q, w4.scale,
                                               jnp.bfloat16).as_text()
    test_int4_product_is_the_bf16_product_of_its_dequantized_weight_bit_for_bit(m, k, n)
    test_int4_product_scales_each_row_then_rounds_once(m, k, n)


def test_lora_step_of_a_bf16_model_with_and_without_the_kernel(monkeypatch):
    check_lora_step_with_and_without_kernels(small_configs()[0], monkeypatch, gemm, 'product')
