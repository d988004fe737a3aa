"""The cross-entropy kernel (kernels/cross_entropy.h) against float64 sums, and the loss of a
bfloat16 LoRA step with it and without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n.layers import cross_entropy, decode_kernels, gemm
from hf_oracle import small_configs
from lora_kernel_check import check_lora_step_with_and_without_kernels

pytestmark = pytest.mark.skipif(not gemm.available(),
                                reason='the kernel needs AVX-512 and the kernels built')

F32_EPS = 2.0 ** -24
# Round to nearest: at most half a bfloat16 step, 2^-8 of the value's power of two, so at most
# 2^-8 of the value.
BF16_HALF_STEP = 2.0 ** -8


def _chunk(rows, vocab, seed=0):
    """bf16 logits with a wide range (a row far above the rest, one far below: the max shift
    and the exponential's floor), targets at both ends, weights 0 (a masked row), 1 and 0.5."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab)) * 3.0
    logits[1] += 60.0
    logits[2, : vocab // 2] -= 200.0
    targets = rng.integers(0, vocab, rows)
    targets[:2] = (0, vocab - 1)
    weights = np.where(np.arange(rows) % 3 == 0, 1.0, np.where(np.arange(rows) % 3 == 1, 0.5, 0.0))
    weights[:3] = (1.0, 0.5, 1.0)
    return (jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets, jnp.int32),
            jnp.asarray(weights, jnp.float32))


def _exact(logits, targets, weights):
    """float64 losses [R] and gradient [R, V] of the bf16 logits as given."""
    z = np.asarray(logits, np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1)) + z.max(axis=1)
    rows = np.arange(z.shape[0])
    w = np.asarray(weights, np.float64)
    onehot = np.zeros_like(z)
    onehot[rows, np.asarray(targets)] = 1.0
    return w * (log_norm - z[rows, np.asarray(targets)]), w[:, None] * (probs - onehot)


# Vocabularies: under one vector, not whole vectors, whole vectors, and many of them.
@pytest.mark.parametrize('rows,vocab', [(3, 5), (7, 1007), (6, 4096), (3, 65536)])
def test_kernel_losses_and_gradients_equal_float64_within_rounding(rows, vocab):
    logits, targets, weights = _chunk(rows, vocab)
    losses, grad = jax.jit(cross_entropy._kernel)(logits, targets, weights)
    want_losses, want_grad = _exact(logits, targets, weights)
    # Each loss: log of a float32 sum of `vocab` exponentials (each within 2 ulps), plus the
    # max: relative error of the sum at most ~vocab / 64 ulps (64 running sums), of the log far
    # less; bounded generously by 1e-5 of the log-normaliser's size.
    scale = np.abs(np.asarray(logits, np.float64)).max(axis=1) + 1.0
    assert np.all(np.abs(np.asarray(losses, np.float64) - want_losses) <= 1e-5 * scale)
    # Each gradient value: the float32 softmax (within ~1e-6 of itself) rounded to bfloat16 once.
    got = np.asarray(grad, np.float64)
    bound = (BF16_HALF_STEP + 1e-5) * np.abs(want_grad) + 1e-37
    assert np.all(np.abs(got - want_grad) <= bound)
    assert np.all(got[np.asarray(weights) == 0] == 0)          # a masked row: no gradient


def test_a_nan_logit_makes_its_row_nan_as_on_xla():
    logits, targets, weights = _chunk(3, 100)
    logits = logits.at[0, 7].set(jnp.nan)
    losses, grad = jax.jit(cross_entropy._kernel)(logits, targets, weights)
    assert np.isnan(float(losses[0])) and np.all(np.isnan(np.asarray(grad[0], np.float32)))
    assert np.all(np.isfinite(np.asarray(losses[1:]))) and np.all(np.isfinite(grad[1:]))


def test_masked_sum_and_its_gradient_take_the_kernel_and_equal_xla():
    logits, targets, weights = _chunk(5, 3001, seed=1)
    lowered = jax.jit(jax.grad(cross_entropy.masked_sum)).lower(logits, targets, weights)
    assert decode_kernels.TARGETS['cross_entropy'] in lowered.as_text()
    total, grad = jax.jit(jax.value_and_grad(cross_entropy.masked_sum))(logits, targets, weights)
    xla = lambda *a: cross_entropy._xla_sum(*a)
    want_total, want_grad = jax.value_and_grad(xla)(logits, targets, weights)
    np.testing.assert_allclose(float(total), float(want_total), rtol=1e-5)
    got, want = np.asarray(grad, np.float64), np.asarray(want_grad, np.float64)
    assert np.all(np.abs(got - want) <= 2 * BF16_HALF_STEP * np.abs(want) + 1e-37)
    # Without the gradient (an eval loss), the forward is XLA's: the kernel is not called.
    assert decode_kernels.TARGETS['cross_entropy'] not in jax.jit(
        cross_entropy.masked_sum).lower(logits, targets, weights).as_text()


def test_float32_logits_stay_on_xla():
    logits, targets, weights = _chunk(3, 64)
    assert not cross_entropy.applies(logits.astype(jnp.float32))
    lowered = jax.jit(jax.grad(cross_entropy.masked_sum)).lower(
        logits.astype(jnp.float32), targets, weights)
    assert decode_kernels.TARGETS['cross_entropy'] not in lowered.as_text()


def test_lora_step_of_a_bf16_model_with_and_without_the_kernel(monkeypatch):
    check_lora_step_with_and_without_kernels(small_configs()[0], monkeypatch, cross_entropy,
                                             '_kernel')
