"""The masked-rows kernels (gemma3n/layers/masked_rows.py): a sparse FFN's products over many
tokens, each token reading only its kept units' rows. Checked against exact float64 products,
their gradients against XLA's dense masked products, and the FFN of a prefill chunk against
the dense computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n.config import TransformerConfig
from gemma3n.ffn import FeedForward
from gemma3n.layers import ServingWeight, StackedWeight, masked_rows
from gemma3n.layers.lora import LoRAWeight
from lora_kernel_check import LOSS_RTOL, lora_gradients, relative_l2, traced_calls

F32_EPS = 2.0 ** -24
BF16_EPS = 2.0 ** -8

pytestmark = pytest.mark.skipif(not masked_rows.applies(jnp.zeros((1, 128), jnp.bfloat16),
                                                        jnp.zeros((32, 128), jnp.bfloat16)),
                                reason='the kernels need AVX-512 BF16 and the kernels built')

# (tokens, units F, width D): one token; several blocks of 128 units and a last partial one;
# more tokens than a thread's share; the widest row the sums keep in registers at once and more;
# more tokens than one pass takes.
SHAPES = [(1, 32, 128), (37, 416, 256), (300, 160, 128), (5, 64, 640), (1100, 64, 128)]


def _operands(t, f, d, density, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
    h = jnp.asarray(rng.standard_normal((t, f)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((f, d)), jnp.bfloat16)
    keep = rng.random((t, f)) < density
    keep[0] = False                                        # a token that keeps nothing
    # The mask's values are any nonzero; -0.0 counts as zero, as `!= 0` says.
    mask = np.where(keep, rng.standard_normal((t, f)), -0.0).astype(np.float32)
    return x, h, w, jnp.asarray(mask, jnp.bfloat16), keep


def _summation_bound(k, magnitude):
    """Float32 sums of k exact products in any order: within (k - 1)·eps·Σ|a·b|."""
    return 2 * max(k - 1, 1) * F32_EPS * magnitude


@pytest.mark.parametrize('t,f,d', SHAPES)
@pytest.mark.parametrize('density', [0.05, 0.6])
def test_products_equal_exact_masked_products(t, f, d, density):
    x, h, w, mask, keep = _operands(t, f, d, density)
    x64, h64, w64 = (np.asarray(a, np.float64) for a in (x, h, w))

    got = np.asarray(jax.jit(masked_rows.masked_dot)(x, w, mask), np.float64)
    exact = np.where(keep, x64 @ w64.T, 0.0)
    magnitude = np.where(keep, np.abs(x64) @ np.abs(w64).T, 0.0)
    assert got.shape == (t, f)
    assert np.all(got[~keep] == 0)
    # Rounded to bfloat16 after a float32 sum.
    bound = _summation_bound(d, magnitude) * (1 + BF16_EPS) + BF16_EPS * np.abs(exact)
    assert np.all(np.abs(got - exact) <= bound + 1e-30)

    got = np.asarray(jax.jit(masked_rows.masked_sum)(h, w, mask), np.float64)
    kept_h = np.where(keep, h64, 0.0)
    exact, magnitude = kept_h @ w64, np.abs(kept_h) @ np.abs(w64)
    assert got.shape == (t, d)
    assert np.all(got[0] == 0)
    assert np.all(np.abs(got - exact) <= _summation_bound(f, magnitude) + 1e-30)


def _dense(kind, a, w, mask):
    """The same products by XLA: the masked operand zeroed, dense einsums."""
    kept = mask != 0
    if kind == 'dot':
        y = jnp.einsum('td,fd->tf', a, w, preferred_element_type=jnp.float32)
        return jnp.where(kept, y, 0.0).astype(jnp.bfloat16)
    return jnp.einsum('tf,fd->td', jnp.where(kept, a, jnp.zeros((), a.dtype)), w,
                      preferred_element_type=jnp.float32)


@pytest.mark.parametrize('kind', ['dot', 'sum'])
def test_gradients_equal_xla_dense_masked_products(kind):
    x, h, w, mask, _ = _operands(37, 416, 256, 0.1, seed=3)
    a = x if kind == 'dot' else h
    ours = masked_rows.masked_dot if kind == 'dot' else masked_rows.masked_sum
    cotangent = jnp.asarray(np.random.default_rng(4).standard_normal(
        (37, 416 if kind == 'dot' else 256)), jnp.bfloat16).astype(jnp.float32)

    def pullback(product):
        y, vjp = jax.vjp(lambda a, w: product(a, w, mask).astype(jnp.float32), a, w)
        return y, vjp(cotangent)

    xla = functools.partial(_dense, kind)
    (y, (da, dw)), (y_want, (da_want, dw_want)) = (
        jax.jit(pullback, static_argnums=0)(p) for p in (ours, xla))
    for got, want in ((y, y_want), (da, da_want), (dw, dw_want)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape
        # The same terms summed in another float32 order, each result rounded once to bf16.
        scale = np.max(np.abs(want))
        assert scale > 0
        assert np.max(np.abs(got - want)) <= 2 * BF16_EPS * scale
    # Only the kept units carry the activation's gradient.
    if kind == 'sum':
        assert np.all(np.asarray(da)[np.asarray(mask) == 0] == 0)


def test_frozen_weight_keeps_no_input_for_its_gradient():
    x, _, w, mask, _ = _operands(37, 416, 256, 0.1)
    # Differentiating in x only: no [T, F]-sized weight-gradient einsum in the program.
    text = jax.jit(jax.grad(lambda x: jnp.sum(masked_rows.masked_dot(x, w, mask)
                                              .astype(jnp.float32)))).lower(x).as_text()
    assert masked_rows.decode_kernels.TARGETS['masked_sum'] in text
    assert 'dot_general' not in text


def _ffn_and_layouts(d=256, f=2048, tokens=40):
    """A sparse bfloat16 FFN, x [2, tokens, d], and its params as initialised and in the sparse
    rows layout (gemma3n.layout: gate and up as two leaves, all [F, D])."""
    ffn = FeedForward(features=d, hidden_dim=f, transpose_gating_einsum=True, sparsity=0.95,
                      dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, tokens, d)), jnp.bfloat16)
    params = ffn.init(jax.random.key(0), x)['params']
    gating, linear = params['gating_einsum'], params['linear']
    rows = {'gating_einsum': StackedWeight(parts=tuple(ServingWeight(g, (0, 1))
                                                       for g in gating)),
            'linear': ServingWeight(linear, (0, 1))}
    return ffn, x, params, rows


def test_ffn_of_a_prefill_chunk_reads_kept_rows_and_equals_dense():
    ffn, x, params, rows = _ffn_and_layouts()
    apply = jax.jit(lambda p, x: ffn.apply({'params': p}, x))
    lowered = apply.lower(rows, x).as_text()
    assert masked_rows.decode_kernels.TARGETS['masked_dot'] in lowered
    assert masked_rows.decode_kernels.TARGETS['masked_sum'] in lowered
    got = np.asarray(apply(rows, x), np.float32)
    want = np.asarray(apply(params, x), np.float32)
    magnitude = np.max(np.abs(want))
    # Only the float32 summation order differs, then one bf16 rounding of each output.
    assert np.max(np.abs(got - want)) <= (2 * ffn.hidden_dim * F32_EPS * 4 + BF16_EPS) * magnitude


def test_lora_ffn_of_many_tokens_equals_dense():
    ffn, x, params, rows = _ffn_and_layouts(d=128, f=1024, tokens=96)
    rng = np.random.default_rng(2)
    rank, d, f = 4, ffn.features, ffn.hidden_dim
    factors = [jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)
               for shape in ((2, d, rank), (2, rank, f), (f, rank), (rank, d))]
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def loss(tree, gate_a, gate_b, down_a, down_b, x):
        adapted = {
            'gating_einsum': LoRAWeight(base=tree['gating_einsum'], a=gate_a, b=gate_b,
                                        scale=2.0, in_axes=(2,), stacked=1),
            'linear': LoRAWeight(base=tree['linear'], a=down_a, b=down_b, scale=2.0,
                                 in_axes=(0,), stacked=0)}
        return jnp.sum(ffn.apply({'params': adapted}, x).astype(jnp.float32) * weights)

    # Op by op (no jit): XLA's fusions would skip some bf16 roundings on the dense side only.
    grads = jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5))
    traced = []
    with pytest.MonkeyPatch.context() as patch:
        entry = masked_rows._kernel
        patch.setattr(masked_rows, '_kernel', lambda *a: traced.append(1) or entry(*a))
        got_loss, got = grads(rows, *factors, x)
    assert traced
    want_loss, want = grads(params, *factors, x)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=BF16_EPS)
    *got_factors, got_dx = (np.asarray(g, np.float64) for g in got)
    *want_factors, want_dx = (np.asarray(g, np.float64) for g in want)
    # Measured: the adapter gradients equal, dx 0.4% apart (L2): dx sums the gate's, up's and
    # adapters' bf16-rounded products, each rounded in its own order on each side.
    for g, w in zip(got_factors, want_factors):
        assert np.linalg.norm(g - w) <= BF16_EPS * np.linalg.norm(w)
    assert np.linalg.norm(got_dx - want_dx) <= 4 * BF16_EPS * np.linalg.norm(want_dx)


# A LoRA step of this config in bfloat16 is far from its float32 value: measured, XLA's adapter
# gradients 30% off in L2 (one bf16 rounding, carried through 5 layers, moves them that much),
# ours with the masked kernels 33%; the two 8.7% apart. So ours is held to float32 as XLA's is:
# at most 1.25x XLA's distance, and the loss within 1e-3 as in test_gemm.py. The FFN itself,
# without jit's fusions, equals the dense one (test above and below).
STEP_ERROR_RATIO = 1.25


def test_lora_step_reads_kept_rows_as_near_float32_as_xla(monkeypatch):
    # Widths the kernels take (D a multiple of 128); the first two layers sparse.
    cfg = TransformerConfig.gemma3n(num_layers=5, num_shared_layers=0, num_sparse_layers=2,
                                    embed_dim=128, hidden_dim=1024, num_heads=4, num_kv_heads=2,
                                    num_embed=300, head_dim=16, per_layer_input_dim=8,
                                    laurel_rank=4, sliding_window_size=8)
    calls = traced_calls(monkeypatch, masked_rows, '_kernel')
    loss, ours = lora_gradients(cfg, monkeypatch, 'auto')
    assert calls
    xla_loss, xla = lora_gradients(cfg, monkeypatch, 'off')
    f32_loss, f32 = lora_gradients(cfg, monkeypatch, 'off', jnp.float32)
    print(f'loss: masked kernels {loss:.6f}, XLA {xla_loss:.6f}, float32 {f32_loss:.6f}; '
          f'gradients from float32: ours {relative_l2(ours, f32):.3f}, XLA '
          f'{relative_l2(xla, f32):.3f}')
    assert abs(loss - f32_loss) <= LOSS_RTOL * abs(f32_loss)
    assert relative_l2(ours, f32) <= STEP_ERROR_RATIO * relative_l2(xla, f32)
