"""Our CPU kernels for a sparse FFN's products over many tokens (a prefill chunk, a training
batch), computing only the units each token keeps (`kernels/masked_rows.h`, AVX-512 BF16).

In a layer with activation sparsity the gate after its gaussian top-k (`gemma3n.ffn`) keeps ~5%
of the units of each token, and a zero unit contributes nothing to the up and down products.
A decode step reads the union of its few tokens' kept rows (`gemma3n.sparse_rows`); over many
tokens that union is every row, but each token's own units are still ~5%. With both weights
stored rows first [F, D]:

- `masked_dot(x, w, mask)` = (x · wᵀ) where mask != 0, else 0: [T, D] -> [T, F] bfloat16
  (float32 sums, rounded as a bfloat16 product is);
- `masked_sum(h, w, mask)` = (h where mask != 0, else 0) · w: [T, F] -> [T, D] float32.

Each is the other's gradient in its activation operand, so both are differentiable: the
gradient in w is XLA's einsum of the masked operands, the operand kept for it only when w
needs one. The mask gets no gradient (only its zeros count). Sums are float32 (bfloat16
products exact), in another order than the dense product's.

They apply (`applies`) where our kernels of many rows can run (`gemm.available`: AVX-512 BF16,
one device), with bfloat16 operands, D a multiple of `D_MULTIPLE` and F of `F_MULTIPLE`; also on
a CPU with AMX, where the dense products go to XLA: there, at 512 tokens of E4B's sparse FFN
(2 cores), `masked_dot` took 20.7 ms against XLA's dense product's 69.4, `masked_sum` 30.3
against 36.9.

Example:
    >>> up = masked_dot(x, w_up, top).astype(jnp.bfloat16)         # x [T, D], w_up [F, D]
    >>> y = masked_sum(gelu(top) * up, w_down, top)                  # w_down [F, D] -> [T, D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma3n.layers import decode_kernels, gemm

# The kernels' shape requirements (the C++ side's kMaskedSumColumns and kMaskedLane).
D_MULTIPLE, F_MULTIPLE = 128, 32


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether the kernels take activations x [..., D] with a weight w [F, D]."""
    return (x.dtype == w.dtype == jnp.bfloat16 and w.ndim == 2 and x.shape[-1] == w.shape[1]
            and w.shape[1] % D_MULTIPLE == 0 and w.shape[0] % F_MULTIPLE == 0
            and gemm.available())


def _kernel(kind: str, a: jax.Array, w: jax.Array, mask: jax.Array, columns: int,
            dtype: jnp.dtype) -> jax.Array:
    if not gemm.available():        # which also registers the kernels
        raise RuntimeError('the masked-rows kernels need AVX-512 BF16 and one device.')
    result = jax.ShapeDtypeStruct((a.shape[0], columns), dtype)
    return jax.ffi.ffi_call(decode_kernels.TARGETS[kind], result)(a, w, mask)


def _masked(a: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask != 0, a, jnp.zeros((), a.dtype))


@jax.custom_vjp
def masked_dot(x: jax.Array, w: jax.Array, mask: jax.Array) -> jax.Array:
    """x [T, D] · w [F, D]ᵀ at mask [T, F]'s nonzeros, 0 elsewhere -> [T, F]; all bfloat16."""
    return _kernel('masked_dot', x, w, mask, w.shape[0], jnp.bfloat16)


@jax.custom_vjp
def masked_sum(h: jax.Array, w: jax.Array, mask: jax.Array) -> jax.Array:
    """(h [T, F] at mask [T, F]'s nonzeros, 0 elsewhere) · w [F, D] -> [T, D] float32; all
    bfloat16."""
    return _kernel('masked_sum', h, w, mask, w.shape[1], jnp.float32)


def _fwd(product, a, w, mask):
    # Each operand is kept only for the other's gradient: a frozen weight's input is not.
    residuals = (a.value if w.perturbed else None, w.value if a.perturbed else None, mask.value)
    return product(a.value, w.value, mask.value), residuals


def _bwd(dual, residuals, g):
    a, w, mask = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    # Both products are bfloat16 where they are used (masked_sum's rounded by its caller), so
    # their cotangents hold bfloat16 values.
    g = g.astype(jnp.bfloat16)
    da = None if w is None else dual(g, w, mask).astype(jnp.bfloat16)
    dw = None
    if a is not None:
        # dw[f] = sum over t of (the [T, F] operand, masked)[t, f] · (the [T, D] one)[t]: g and
        # x for masked_dot (whose dual is masked_sum), h and g for masked_sum.
        per_unit, per_token = (g, a) if dual is masked_sum else (a, g)
        dw = jnp.einsum('tf,td->fd', _masked(per_unit, mask), per_token,
                        preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    return da, dw, None


masked_dot.defvjp(lambda x, w, mask: _fwd(masked_dot, x, w, mask),
                  lambda res, g: _bwd(masked_sum, res, g), symbolic_zeros=True)
masked_sum.defvjp(lambda h, w, mask: _fwd(masked_sum, h, w, mask),
                  lambda res, g: _bwd(masked_dot, res, g), symbolic_zeros=True)
