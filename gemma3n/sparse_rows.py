"""Decoding a sparse layer's FFN by reading only the rows of the units it keeps.

In a layer with activation sparsity the gaussian top-k (`gemma3n.ffn.gaussian_topk`) zeroes
all gate units below mean + z·std (E4B: z = Φ⁻¹(0.95), ~5% kept), and a zeroed unit
contributes exactly nothing: gelu(0) · up = 0. So for a few tokens (decode) the FFN computes
the gate, finds the kept units of each token, and reads only their rows of the up projection
and of the down projection, which the serving layout stores rows first for that
(`gemma3n.layout`: gate and up as the two leaves of a `StackedWeight`, the down projection
[F, D]). Every leaf type can gather its own rows (`StoredWeight.rows`), so bf16, float32, int8
and int4 all take this path, and each product is the dense one minus its zero terms: int8
equals the dense computation bit for bit, the float formats and int4 up to float32 summation
order.

bfloat16 weights on the decode kernels read the rows in place, once for all the step's tokens:
the units any token keeps (`union_ffn`; ~1 - 0.95^T of them for T unrelated tokens), whose
count the kernels take at run time (`decode_kernels.gathered_dot` and `gathered_sum`), so
nothing is copied and nothing depends on a capacity. A token's zero gate units contribute
exactly nothing there too, so this is the dense product minus zero terms.

Many tokens (a prefill chunk, a training batch) keep nearly every unit between them, but each
keeps its own ~5%: bfloat16 weights on the AVX-512 kernels take only those, token by token,
reading the weights once for all tokens (`masked_ffn`, `gemma3n.layers.masked_rows`), again the
dense product minus zero terms, differentiable, under LoRA adapters too.

Other formats gather copies of each token's rows, and shapes must be static: each token gathers
`capacity(F, sparsity)` rows (twice the expected count), padded with row 0 whose activation
is masked to 0; a step in which some token keeps more runs the dense product instead
(`lax.cond`, one branch executed), so the result never depends on the capacity.

Example:
    >>> if applies(gating, linear, x):                       # x: [B, L, D]
    ...     y = sparse_ffn(x, top, gating.parts[1], 'TD,FD->TF', linear, 0.95)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gemma3n.layers import (ServingWeight, StackedWeight, StoredWeight, contract, decode_kernels,
                            masked_rows)
from gemma3n.layers.gated_gelu import gated_gelu
from gemma3n.layers.lora import LoRAWeight

# Tokens per call up to which the FFN gathers each token's rows: past a few tokens the dense
# product, which reads every row once for all of them, is cheaper. The union of kept units
# (bfloat16 on the kernels) reads each row once too: it takes as many tokens as the kernels.
MAX_TOKENS = 8
# Rows gathered per token, in multiples of the expected count F · (1 - sparsity).
CAPACITY_FACTOR = 2.0


def capacity(hidden_dim: int, sparsity: float) -> int:
    """Rows gathered per token (static), at most `hidden_dim`."""
    return min(hidden_dim, math.ceil(hidden_dim * (1.0 - sparsity) * CAPACITY_FACTOR))


def stacked_parts(gating: object) -> tuple[StoredWeight, StoredWeight] | None:
    """The gate and up leaves of `gating` when it holds them apart (the sparse rows layout's
    `StackedWeight`, or a LoRA adapter over one); None otherwise."""
    if isinstance(gating, StackedWeight):
        return gating.parts
    if isinstance(gating, LoRAWeight) and isinstance(gating.base, StackedWeight):
        return gating.part(0), gating.part(1)
    return None


def applies(gating: object, linear: object, x: jax.Array) -> bool:
    """Whether the FFN of x [..., D] with these weight leaves reads rows: weights in the sparse
    rows layout (`gemma3n.layout`), and a decode-sized call or the masked-rows kernels."""
    parts = stacked_parts(gating)
    if parts is None:
        return False
    tokens = math.prod(x.shape[:-1])
    # A decode step's rows need the plain leaves; a LoRA adapter's only the masked kernels'.
    if isinstance(gating, StackedWeight) and getattr(linear, 'order', None) == (0, 1):
        union = read_in_place(x, parts[1]) and read_in_place(x, linear)
        if tokens <= (decode_kernels.MAX_ROWS if union else MAX_TOKENS):
            return True
    return tokens > decode_kernels.MAX_ROWS and masked(x, parts[1], linear)


def _rows_array(leaf: object) -> jax.Array | None:
    """The array stored [F, D] under `leaf` (a `ServingWeight`, alone or as a LoRA base)."""
    base = leaf.base if isinstance(leaf, LoRAWeight) else leaf
    return base.value if isinstance(base, ServingWeight) and base.value.ndim == 2 else None


def masked(x: jax.Array, up: StoredWeight, linear: StoredWeight) -> bool:
    """Whether the masked-rows kernels take x's tokens with these leaves: up and down stored
    [F, D], in the sparse rows layout, maybe under LoRA adapters."""
    up_rows, down_rows = _rows_array(up), _rows_array(linear)
    down = linear.base if isinstance(linear, LoRAWeight) else linear
    return (up_rows is not None and down_rows is not None and down.order == (0, 1)
            and up_rows.shape == down_rows.shape and masked_rows.applies(x, up_rows)
            and masked_rows.applies(x, down_rows))


def read_in_place(x: jax.Array, leaf: StoredWeight) -> bool:
    """Whether the decode kernels read rows of `leaf` (stored [F, D]) for x in place: both in
    bfloat16, the kernels on."""
    return (isinstance(leaf, ServingWeight) and leaf.value.ndim == 2
            and x.dtype == leaf.value.dtype == jnp.bfloat16 and decode_kernels.enabled())


def union_ffn(xt: jax.Array, top: jax.Array, up: jax.Array, linear: jax.Array) -> jax.Array:
    """The FFN output [T, D] of tokens xt [T, D] (bfloat16) whose gates after the top-k are
    `top` [T, F], reading once, in place, the rows of `up` and `linear` (both stored [F, D])
    of the units some token keeps."""
    ids, count = decode_kernels.kept_ids(top, top.shape[-1], any_row=True)
    ids, count = ids[0], count[0]                                      # [F], count of them used
    # Rounded to the activations' dtype where the dense path's products are.
    kept_up = decode_kernels.gathered_dot(xt, ids, count, up).astype(xt.dtype)   # [T, F]
    hidden = gated_gelu(jnp.take(top, ids, axis=1), kept_up)
    return decode_kernels.gathered_sum(hidden, ids, count, linear).astype(xt.dtype)


def masked_ffn(xt: jax.Array, top: jax.Array, up: StoredWeight, up_eqn: str,
               linear: StoredWeight) -> jax.Array:
    """The FFN output [T, D] of tokens xt [T, D] whose gates after the top-k are `top` [T, F],
    each token reading only its kept units' rows of `up` and `linear` (both stored [F, D],
    bfloat16; `masked`). A LoRA adapter's low-rank terms are added dense, as its `contract`
    adds them (a rank-r product; a unit's up term counts only where gelu(top) is not 0)."""
    kept_up = masked_rows.masked_dot(xt, _rows_array(up), top)
    if isinstance(up, LoRAWeight):
        kept_up = kept_up + up.update(up_eqn, xt)
    hidden = gated_gelu(top, kept_up)
    y = masked_rows.masked_sum(hidden, _rows_array(linear), top).astype(xt.dtype)
    if isinstance(linear, LoRAWeight):
        y = y + linear.update('TF,FD->TD', hidden)
    return y


def sparse_ffn(x: jax.Array, gate_top: jax.Array, up: StoredWeight, up_eqn: str,
               linear: StoredWeight, sparsity: float) -> jax.Array:
    """The FFN output [B, L, D] of x [B, L, D] whose gate after the top-k is `gate_top`
    [B, L, F], reading only the kept units' rows of the up projection `up` (stored [F, D];
    `up_eqn` contracts x [T, D] with it in its checkpoint order, 'TD,FD->TF' or 'TD,DF->TF')
    and of the down projection `linear` (stored [F, D])."""
    *lead, d = x.shape
    f = gate_top.shape[-1]
    xt, top = x.reshape(-1, d), gate_top.reshape(-1, f)       # [T, D], [T, F]
    if xt.shape[0] > decode_kernels.MAX_ROWS and masked(x, up, linear):
        return masked_ffn(xt, top, up, up_eqn, linear).reshape(*lead, d)
    if read_in_place(x, up) and read_in_place(x, linear):
        return union_ffn(xt, top, up.value, linear.value).reshape(*lead, d)
    size = capacity(f, sparsity)
    # Each token's kept units, in increasing order, padded with 0 past its count.
    ids, counts = decode_kernels.kept_ids(top, size)                   # [T, size], [T]

    def rows() -> jax.Array:
        valid = jnp.arange(size) < counts[:, None]
        out = []
        # Token by token: the up product is then one row times rows [C, D], which the decode
        # kernels take (`gemma3n.layers.decode_kernels`), read in place where the format can
        # (`StoredWeight.dot_rows`: int4), else gathered; the down product (rows [C, D] = [in,
        # out]) reads the kept rows in place where the format can (`StoredWeight.rows_contract`:
        # int8), else XLA's x @ w of the gathered rows.
        for t in range(xt.shape[0]):
            kept_up = up.dot_rows(xt[t], ids[t])
            hidden = gated_gelu(top[t, ids[t]], kept_up)
            hidden = jnp.where(valid[t], hidden, jnp.zeros((), hidden.dtype))
            out.append(linear.rows_contract(hidden, ids[t]))
        return jnp.stack(out)

    def dense() -> jax.Array:
        hidden = gated_gelu(top, contract(up_eqn, xt, up))
        return contract('TF,FD->TD', hidden, linear)

    return jax.lax.cond(jnp.max(counts) <= size, rows, dense).reshape(*lead, d)
