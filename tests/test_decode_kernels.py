"""Our CPU decode kernels against XLA's products: every instruction-set variant, odd sizes,
several rows, the fallback when they are off or cannot be built, and a decoding model."""

import logging
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n import Gemma3nTransformer, Sampler
from gemma3n.layers import decode_kernels, kernel_build
from gemma3n.layers.einsum import _xla_dot, contract
from gemma3n.layout import to_serving
from hf_oracle import random_params, small_configs

# The variants this CPU can run ('avx512' is capped at the best it has; named, rather than
# 'auto', so that a CPU with AMX runs the kernels at every row count too: `max_rows`).
ISAS = ['avx512', 'avx2', 'scalar']
F32_EPS = 2.0 ** -24        # float32 unit roundoff
# (rows, K, N): K and N off every vector width (32 bf16, 64 int8 per AVX-512 step); every row
# count of the register tiles (M >= 2: one tile up to 4 rows, two of 2-4 rows up to 8, then a
# tile of 4 and the rest split so again: 9 = 4 + 3 + 2, 16 = 4 + 4 + 4 + 4), N off their 4
# weight rows; the 2049 shapes' weights are split across threads in chunks of rows that are
# not whole tiles either (ParallelFor's grain: 65536 bytes of the weight); one row of K past
# kRowKernelMaxK (8192), which the AVX-512 bf16 kernel computes with the tile, not the row loop.
SHAPES = [(1, 1, 1), (1, 2048, 96), (3, 77, 45), (8, 1000, 33), (2, 63, 130), (4, 129, 7),
          (5, 64, 9), (6, 31, 5), (7, 2049, 37), (9, 95, 11), (13, 33, 6), (16, 2049, 21),
          (1, 8243, 11)]


pytestmark = pytest.mark.skipif(decode_kernels._library() is None,
                                reason='the decode kernels could not be built here')


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv(decode_kernels.ENV, request.param)
    return request.param


def _operands(rows, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == jnp.int8:
        # The full int8 range, -128 included: the kernels are exact for any int8 input.
        return (jnp.asarray(rng.integers(-128, 128, (rows, k)), jnp.int8),
                jnp.asarray(rng.integers(-128, 128, (n, k)), jnp.int8))
    return (jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16),
            jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16))


def _kernel_and_xla(eqn, x, w):
    # Fresh functions: the kernels' switch is read when a function is traced.
    kernel = jax.jit(lambda x, w: decode_kernels.dot(eqn, x, w, _xla_dot))
    return kernel(x, w), jax.jit(lambda x, w: _xla_dot(eqn, x, w))(x, w)


def _f32_dot(eqn, x, w):
    return jnp.einsum(eqn, x, w, preferred_element_type=jnp.float32)


def _within_summation_noise(got, x, w, terms):
    """got == x [M, K] · w [K, N] up to float32 summation order: products of bf16 values are
    exact in float32, only the order of the K - 1 additions differs, each sum being within
    (K - 1)·eps·Σ|x·w| of the exact one."""
    want = _f32_dot('mk,kn->mn', x, w)
    magnitude = np.asarray(_f32_dot('mk,kn->mn', jnp.abs(x), jnp.abs(w)))
    bound = 2 * max(terms - 1, 1) * F32_EPS * magnitude
    assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= bound)


@pytest.mark.parametrize('isa', ISAS, indirect=True)
@pytest.mark.parametrize('rows,k,n', SHAPES)
def test_bf16_rows_equal_xla_within_summation_noise(isa, rows, k, n):
    x, w = _operands(rows, k, n, jnp.bfloat16)
    _within_summation_noise(decode_kernels._bf16_rows(x, w), x, w.T, k)


@pytest.mark.parametrize('isa', ISAS, indirect=True)
@pytest.mark.parametrize('rows,k,n', SHAPES)
@pytest.mark.parametrize('x_without_min', [False, True])
def test_int8_rows_equal_xla_exactly(isa, rows, k, n, x_without_min):
    x, w = _operands(rows, k, n, jnp.int8)
    if x_without_min:
        # Activations as the int8 representation quantizes them (never -128), which the AVX2
        # one-row kernel takes on its faster path; the weight keeps the full range.
        x = jnp.maximum(x, -127).astype(jnp.int8)
    got = decode_kernels._int8_rows(x, w)
    want = jnp.einsum('mk,nk->mn', x, w, preferred_element_type=jnp.int32)
    np.testing.assert_array_equal(got, want)


# (rows, C, F, D): D off the strips (64 columns AVX-512, 16 AVX2) and C odd (rows in pairs).
@pytest.mark.parametrize('isa', ISAS, indirect=True)
@pytest.mark.parametrize('rows,c,f,d', [(1, 7, 20, 200), (3, 64, 100, 64), (8, 33, 40, 17),
                                        (1, 1, 3, 130)])
def test_gathered_rows_equal_xla_exactly(isa, rows, c, f, d):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.integers(-128, 128, (rows, c)), jnp.int8)
    w = jnp.asarray(rng.integers(-128, 128, (f, d)), jnp.int8)
    # Repeated ids, and two out of range, clipped to the nearest row as jnp.take(mode='clip').
    ids = jnp.asarray(np.concatenate([rng.integers(0, f, c - min(c, 2)), [-5, f + 3][:c]]),
                      jnp.int32)
    kernel = jax.jit(decode_kernels.gathered_rows)
    assert decode_kernels.TARGETS['int8_rows'] in kernel.lower(x, ids, w).as_text()
    want = jnp.einsum('mc,cd->md', x, w[jnp.clip(ids, 0, f - 1)],
                      preferred_element_type=jnp.int32)
    np.testing.assert_array_equal(kernel(x, ids, w), want)


# (rows, K or D, C, F, count): K and D off the vector widths and strips (32 bf16 columns
# AVX-512, 16 AVX2), odd counts (rows go in pairs), none used, all used, and row blocks of 64
# crossed (the down kernel walks its rows in blocks); one row of K past kRowKernelMaxK.
GATHERED = [(1, 70, 40, 300, 33), (3, 2048, 300, 1000, 257), (8, 32, 64, 64, 64),
            (5, 17, 10, 50, 0), (2, 129, 150, 200, 149), (8, 2049, 7, 9, 7), (16, 40, 90, 120, 77),
            (1, 8243, 13, 40, 11)]


def _gathered_operands(rows, k, c, f, seed=4):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((f, k)), jnp.bfloat16)
    # Repeated ids, and two out of range, clipped to the nearest row as jnp.take(mode='clip').
    ids = jnp.asarray(np.concatenate([rng.integers(0, f, c - min(c, 2)), [-5, f + 3][:c]]),
                      jnp.int32)
    return x, w, ids


@pytest.mark.parametrize('isa', ISAS, indirect=True)
@pytest.mark.parametrize('rows,k,c,f,count', GATHERED)
def test_gathered_bf16_dot_equals_xla_within_summation_noise(isa, rows, k, c, f, count):
    x, w, ids = _gathered_operands(rows, k, c, f)
    kernel = jax.jit(decode_kernels.gathered_dot)
    assert decode_kernels.TARGETS['bf16_gathered'] in kernel.lower(x, ids, count, w).as_text()
    got = np.asarray(kernel(x, ids, count, w))
    assert not got[:, count:].any()                    # ids past the count: no product
    rows_used = w[jnp.clip(ids[:count], 0, f - 1)]
    _within_summation_noise(got[:, :count], x, rows_used.T, k)


@pytest.mark.parametrize('isa', ISAS, indirect=True)
@pytest.mark.parametrize('rows,d,c,f,count', GATHERED)
def test_gathered_bf16_sum_equals_xla_within_summation_noise(isa, rows, d, c, f, count):
    _, w, ids = _gathered_operands(rows, d, c, f)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((rows, c)), jnp.bfloat16)
    kernel = jax.jit(decode_kernels.gathered_sum)
    assert decode_kernels.TARGETS['bf16_rows'] in kernel.lower(x, ids, count, w).as_text()
    # Only x's first `count` columns count: the others hold values that must not be read.
    rows_used = w[jnp.clip(ids[:count], 0, f - 1)]
    _within_summation_noise(kernel(x, ids, count, w), x[:, :count], rows_used, count)


# (rows, F, size, any_row): F off the 32 values of an AVX-512 compare, a size smaller than
# some rows' counts (truncated, as jnp.nonzero's), one row, the union of several.
KEPT = [(1, 16384, 1639, False), (3, 1000, 60, False), (5, 45, 3, False), (4, 1031, 1031, True),
        (1, 7, 7, True), (16, 96, 2, False)]


@pytest.mark.parametrize('isa', ISAS, indirect=True)
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('rows,f,size,any_row', KEPT)
def test_kept_ids_are_numpys_nonzero(isa, dtype, rows, f, size, any_row):
    rng = np.random.default_rng(5)
    values = np.where(rng.random((rows, f)) < 0.06, rng.standard_normal((rows, f)), 0.0)
    # Signed zeros are zeros; a NaN is nonzero (jnp's `!= 0`).
    values[0, :3] = [-0.0, np.nan, 0.0]
    top = jnp.asarray(values, dtype)
    kernel = jax.jit(lambda t: decode_kernels.kept_ids(t, size, any_row))
    assert decode_kernels.TARGETS['kept_ids'] in kernel.lower(top).as_text()
    ids, counts = kernel(top)
    kept = values != 0
    if any_row:
        kept = kept.any(axis=0, keepdims=True)
    assert ids.shape == (len(kept), size) and counts.shape == (len(kept),)
    for row, want in enumerate(kept):
        want = np.flatnonzero(want)
        assert counts[row] == len(want)
        first = want[:size]
        padded = np.concatenate([first, np.zeros(size - len(first), np.int32)])
        np.testing.assert_array_equal(ids[row], padded)


@pytest.mark.parametrize('eqn,x_shape,w_shape', [
    ('BTD,CFD->CBTF', (1, 1, 40), (2, 33, 40)),      # a gating weight: two outputs, batch 1
    ('BTZ,DZ->DBT', (2, 3, 70), (5, 70)),           # six rows
    ('BTNH,DNH->DBT', (1, 2, 3, 5), (9, 3, 5)),     # two contracted axes
])
def test_einsum_forms_go_through_the_kernels(eqn, x_shape, w_shape):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-127, 128, x_shape), jnp.int8)
    w = jnp.asarray(rng.integers(-127, 128, w_shape), jnp.int8)
    lowered = jax.jit(lambda x, w: decode_kernels.dot(eqn, x, w, _xla_dot)).lower(x, w)
    assert decode_kernels.TARGETS['int8'] in lowered.as_text()
    got, want = _kernel_and_xla(eqn, x, w)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('amx', [False, True])
def test_with_amx_bf16_and_int8_products_of_more_rows_stay_on_xla(monkeypatch, amx):
    # XLA's products use AMX tiles there, faster from a few rows on (decode_kernels.AMX_MAX_ROWS).
    monkeypatch.setattr(decode_kernels, 'cpu_has_amx', lambda: amx)
    monkeypatch.setenv(decode_kernels.ENV, 'auto')
    for dtype, kind in ((jnp.bfloat16, 'bf16'), (jnp.int8, 'int8')):
        limit = decode_kernels.AMX_MAX_ROWS[kind] if amx else decode_kernels.MAX_ROWS
        for rows in (limit, limit + 1):
            x, w = _operands(rows, 64, 32, dtype)
            lowered = jax.jit(lambda x, w: decode_kernels.dot('mk,nk->mn', x, w, _xla_dot)
                              ).lower(x, w).as_text()
            assert (decode_kernels.TARGETS[kind] in lowered) == (rows <= limit)
    monkeypatch.setenv(decode_kernels.ENV, 'avx512')          # by name: every row count
    assert decode_kernels.max_rows('bf16') == decode_kernels.MAX_ROWS


def test_products_the_kernels_do_not_take_stay_on_xla():
    x = jnp.ones((1, decode_kernels.MAX_ROWS + 1, 16), jnp.bfloat16)     # a prefill chunk
    w = jnp.ones((4, 16), jnp.bfloat16)
    text = jax.jit(lambda x, w: decode_kernels.dot('BTD,FD->FBT', x, w, _xla_dot)).lower(
        x, w).as_text()
    assert 'gemma3n_matvec' not in text
    # A weight stored [in, out] (the reference layout) is not read as rows either.
    assert decode_kernels.row_plan('BTD', 'DF', 'BTF', (1, 1, 16)) is None
    # Nor one sharing an axis with x (attention's keys: batch and heads).
    assert decode_kernels.row_plan('BTKGH', 'BSKH', 'BKGTS', (1, 1, 2, 2, 8)) is None


def test_off_switch_keeps_xla(monkeypatch):
    monkeypatch.setenv(decode_kernels.ENV, 'off')
    x, w = _operands(1, 64, 8, jnp.bfloat16)
    text = jax.jit(lambda x, w: contract('BD,FD->BF', x, w)).lower(x, w).as_text()
    assert 'gemma3n_matvec' not in text
    monkeypatch.setenv(decode_kernels.ENV, 'sse9')
    with pytest.raises(ValueError, match='GEMMA3N_KERNELS'):
        decode_kernels.requested_isa()


def test_the_sources_compile_for_other_architectures():
    # Elsewhere than x86 only the scalar kernels are compiled: every use of x86 code must sit
    # behind GEMMA3N_X86, which GEMMA3N_PORTABLE turns off here.
    compiler = shutil.which('c++')
    if compiler is None:
        pytest.skip('no C++ compiler here')
    done = subprocess.run([compiler, '-std=c++20', '-fsyntax-only', '-DGEMMA3N_PORTABLE', '-I',
                           jax.ffi.include_dir(), str(kernel_build.SOURCE)],
                          capture_output=True, text=True, timeout=kernel_build.COMPILE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]


def test_without_a_compiler_xla_does_the_work_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv('GEMMA3N_KERNEL_CACHE', str(tmp_path))
    monkeypatch.setenv('CXX', 'no-such-compiler')
    decode_kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=decode_kernels.__name__):
            assert decode_kernels.active_isa() is None
            assert decode_kernels.active_isa() is None          # said once, not per call
        assert [r.getMessage() for r in caplog.records] == [
            "gemma3n: decode kernels unavailable (no C++ compiler found (looked for "
            "'no-such-compiler'; set $CXX)); using XLA matrix products."]
        x, w = _operands(2, 50, 7, jnp.int8)
        got = jax.jit(lambda x, w: contract('BD,FD->BF', x, w))(x, w)
        np.testing.assert_array_equal(got, jnp.einsum('bd,fd->bf', x, w,
                                                      preferred_element_type=jnp.int32))
    finally:
        decode_kernels._library.cache_clear()
    assert not list(tmp_path.iterdir())


def test_bf16_products_have_a_derivative():
    x, w = _operands(2, 40, 6, jnp.bfloat16)
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)

    def loss(x, w, dtype):
        return jnp.sum(contract('BD,FD->BF', x.astype(dtype), w.astype(dtype))
                       .astype(jnp.float32) ** 2)

    got = jax.grad(loss, argnums=(0, 1))(x, w, jnp.bfloat16)
    want = jax.grad(lambda x, w: jnp.sum(_f32_dot('bd,fd->bf', x.astype(jnp.bfloat16),
                                                  w.astype(jnp.bfloat16)).astype(
        jnp.bfloat16).astype(jnp.float32) ** 2), argnums=(0, 1))(x, w)
    for g, h in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32),
                                   rtol=1e-2, atol=1e-2)


@pytest.fixture(scope='module')
def int8_model():
    cfg = small_configs()[0]
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    return to_serving(model, random_params(cfg, seed=0), quantize_int8=True)


def test_int8_decoding_is_unchanged_by_the_kernels(int8_model, monkeypatch):
    model, params = int8_model
    prompts = [[2, 3, 4, 5], [6, 7]]
    runs = {}
    for switch in ('auto', 'off'):
        monkeypatch.setenv(decode_kernels.ENV, switch)
        sampler = Sampler(model=model, params=params, cache_length=32)
        runs[switch] = sampler.sample_tokens(prompts, 6, return_logits=True)
    # int8 products are exact both ways and the rest of the step is the same program: the
    # tokens agree and the logits to float32 rounding.
    assert (runs['auto'].tokens == runs['off'].tokens).all()
    np.testing.assert_allclose(runs['auto'].logits, runs['off'].logits, rtol=0, atol=1e-5)


def test_editing_any_kernel_source_changes_the_build_key(monkeypatch, tmp_path):
    sources = tmp_path / 'kernels'
    shutil.copytree(kernel_build.SOURCE_DIR, sources)
    monkeypatch.setattr(kernel_build, 'SOURCE_DIR', sources)
    keys = {kernel_build.build_key('c++')}
    for header in sorted(sources.glob('*.h')):      # a header only decode_kernels.cc includes
        header.write_text(header.read_text() + '// edited\n')
        keys.add(kernel_build.build_key('c++'))
    assert len(keys) == 1 + len(list(sources.glob('*.h'))) > 2
