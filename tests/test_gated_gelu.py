"""The gated activation's hand-written derivative against torch's autograd of the same
function (`F.gelu(approximate='tanh') * up`), an independent implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma3n.layers.gated_gelu import gated_gelu, paired_gated_gelu

SHAPE = (3, 5, 37)                 # odd sizes: no vector width divides them
F32_RTOL = 2e-6                    # a few float32 ulps: tanh and the order of the products differ
BF16_ROUNDOFF = 2.0 ** -8          # bfloat16's unit roundoff: half its spacing, relative


def _inputs(dtype):
    rng = np.random.default_rng(0)
    # Gates over gelu's whole shape: its negative dip, its knee and its linear part.
    gate = rng.normal(0.0, 2.5, SHAPE).astype(np.float32)
    up, d_out = (rng.normal(0.0, 1.0, SHAPE).astype(np.float32) for _ in range(2))
    return tuple(jnp.asarray(v, dtype) for v in (gate, up, d_out))


def _torch_reference(gate, up, d_out):
    """(out, d gate, d up) from torch autograd in float64 of the given values."""
    g, u = (torch.tensor(np.asarray(v, np.float64), requires_grad=True) for v in (gate, up))
    out = torch.nn.functional.gelu(g, approximate='tanh') * u
    out.backward(torch.tensor(np.asarray(d_out, np.float64)))
    return out.detach().numpy(), g.grad.numpy(), u.grad.numpy()


def _ours(gate, up, d_out, paired):
    if paired:
        out, vjp = jax.vjp(paired_gated_gelu, jnp.stack([gate, up]))
        (d_pair,) = vjp(d_out)
        return out, d_pair[0], d_pair[1]
    out, vjp = jax.vjp(gated_gelu, gate, up)
    return (out, *vjp(d_out))


@pytest.mark.parametrize('paired', [False, True])
def test_float32_values_and_gradients_equal_torch(paired):
    gate, up, d_out = _inputs(jnp.float32)
    ours = _ours(gate, up, d_out, paired)
    for name, mine, ref in zip(('out', 'd gate', 'd up'), ours, _torch_reference(gate, up, d_out)):
        assert mine.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(mine), ref, rtol=F32_RTOL,
                                   atol=F32_RTOL * np.max(np.abs(ref)), err_msg=name)


@pytest.mark.parametrize('paired', [False, True])
def test_bfloat16_gradients_are_the_exact_ones_rounded_once(paired):
    """The backward works in float32 and rounds once: within bfloat16's unit roundoff of the
    exact gradient of the same bfloat16 inputs (plus float32 noise)."""
    gate, up, d_out = _inputs(jnp.bfloat16)
    _, d_gate, d_up = _ours(gate, up, d_out, paired)
    _, ref_gate, ref_up = _torch_reference(gate.astype(jnp.float32), up.astype(jnp.float32),
                                           d_out.astype(jnp.float32))
    for name, mine, ref in (('d gate', d_gate, ref_gate), ('d up', d_up, ref_up)):
        assert mine.dtype == jnp.bfloat16, name
        err = np.abs(np.asarray(mine, np.float64) - ref)
        bound = BF16_ROUNDOFF * np.abs(ref) + 1e-6 * np.max(np.abs(ref))
        assert np.all(err <= bound), (name, float(np.max(err / bound)))


def test_inside_jit_and_grad_of_a_sum():
    gate, up, _ = _inputs(jnp.float32)
    grads = jax.jit(jax.grad(lambda g, u: jnp.sum(gated_gelu(g, u) ** 2), argnums=(0, 1)))(gate,
                                                                                            up)
    _, ref_gate, ref_up = _torch_reference(gate, up, 2.0 * gated_gelu(gate, up))
    np.testing.assert_allclose(np.asarray(grads[0]), ref_gate, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[1]), ref_up, rtol=1e-5, atol=1e-5)


def test_mismatched_inputs_are_named():
    with pytest.raises(ValueError, match=r'gate \(2, 3\) and up \(2, 4\)'):
        gated_gelu(jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r'\(3, 4\) is not \[2, \.\.\., F\]'):
        paired_gated_gelu(jnp.ones((3, 4)))
