"""gelu(gate) · up, the gated activation of Gemma 3n's FFN and per-layer mapping, with a
hand-written derivative.

The forward is `nn.gelu(gate, approximate=True) * up`, the same operations as without the
custom derivative, so inference is untouched. Differentiated by JAX, the tanh approximation
leaves each of its intermediate steps as a residual for the backward pass: in a training step
XLA then materializes half a dozen [B, L, F] arrays per layer, one pass over memory each. Here
the backward keeps only gate and up and recomputes the rest in float32 in one fused pass.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715              # the tanh approximation's cubic coefficient


def _slopes(gate: jax.Array, up: jax.Array,
            d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The float32 cotangents (d gate, d up) of gelu(gate) · up for d_out.

    With t = tanh(c (x + a x³)): gelu(x) = x (1 + t) / 2 and
    gelu'(x) = (1 + t) / 2 + x (1 - t²) c (1 + 3 a x²) / 2.
    """
    x = gate.astype(jnp.float32)
    t = jnp.tanh(SQRT_2_OVER_PI * (x + CUBIC * x * x * x))
    half_one_plus_t = 0.5 * (1.0 + t)
    inner_slope = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x)
    slope = half_one_plus_t + 0.5 * x * (1.0 - t * t) * inner_slope
    d = d_out.astype(jnp.float32)
    return d * up.astype(jnp.float32) * slope, d * x * half_one_plus_t


def _value(gate: jax.Array, up: jax.Array) -> jax.Array:
    """The forward of both functions: the expression the model used before, unchanged."""
    return nn.gelu(gate, approximate=True) * up


@jax.custom_vjp
def gated_gelu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """gelu(gate) · up (gelu's tanh approximation), elementwise.

    Args:
        gate: [..., F] pre-activations.
        up: [..., F], the same shape.
    Returns:
        [..., F] in the promoted dtype of gate and up.
    """
    if gate.shape != up.shape:
        raise ValueError(f'gated_gelu: gate {gate.shape} and up {up.shape} differ in shape')
    return _value(gate, up)


def _forward(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return gated_gelu(gate, up), (gate, up)


def _backward(residuals: tuple[jax.Array, jax.Array],
              d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, up = residuals
    d_gate, d_up = _slopes(gate, up, d_out)
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


gated_gelu.defvjp(_forward, _backward)


@jax.custom_vjp
def paired_gated_gelu(gate_up: jax.Array) -> jax.Array:
    """gelu(gate) · up of the gate and up stacked on the first axis.

    One array in and one stacked cotangent out, as the product that made it gives and takes
    them: measured in a 1 x 512 LoRA step at E4B widths, 0.12 s less of XLA's elementwise work
    than `gated_gelu` of its two halves (2.29 against 2.41 s).

    Args:
        gate_up: [2, ..., F], gate at 0 and up at 1.
    Returns:
        [..., F].
    """
    if gate_up.shape[:1] != (2,):
        raise ValueError(f'paired_gated_gelu: gate_up {gate_up.shape} is not [2, ..., F]')
    return _value(gate_up[0], gate_up[1])


def _paired_forward(gate_up: jax.Array) -> tuple[jax.Array, jax.Array]:
    return paired_gated_gelu(gate_up), gate_up


def _paired_backward(gate_up: jax.Array, d_out: jax.Array) -> tuple[jax.Array]:
    d_gate, d_up = _slopes(gate_up[0], gate_up[1], d_out)
    return (jnp.stack([d_gate, d_up]).astype(gate_up.dtype),)


paired_gated_gelu.defvjp(_paired_forward, _paired_backward)
