"""LoRA: a frozen projection weight plus a trainable low-rank update, as one params leaf.

`LoRAWeight(base, a, b, scale, in_axes, stacked)` applies `base` (any projection leaf: a plain
array, a `ServingWeight`, an int8 `QuantizedWeight`) through the existing `contract` dispatch
and adds `scale · (x·a)·b`, its einsums built from the call site's own einsum letters, so no
module changes. The factors are laid out from the weight's checkpoint axes:

- the first `stacked` axes hold independent matrices (kv_einsum's K and V, gating_einsum's gate
  and up): each gets its own adapter, and a half without one holds zero factors, which receive
  zero gradient and so stay exactly zero;
- a: [stacked..., in..., rank] reads the weight's input axes `in_axes`;
- b: [stacked..., rank, out...] writes every other axis, in checkpoint order (q_einsum's heads
  count as outputs, as in the Hugging Face q_proj whose rows are heads x head_dim).

Example:
    >>> w = LoRAWeight(base=q_w, a=a, b=b, scale=2.0, in_axes=(1,), stacked=0)  # q [N, D, H]
    >>> contract('BTD,NDH->BTNH', x, w)    # x·q_w + 2·(x·a)·b, a [D, r], b [r, N, H]
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from gemma3n.layers.einsum import StackedWeight, StoredWeight, contract, contract_parts, dot


def _fresh_letter(used: str) -> str:
    return next(c for c in 'RZYXWVUQPO' if c not in used)


@flax.struct.dataclass
class LoRAWeight(StoredWeight):
    """base: the frozen weight leaf (checkpoint-order shape S); a: [S[:stacked], S[in_axes]...,
    r]; b: [S[:stacked], r, S[other axes]...]; the weight applied is base + scale · a·b."""
    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = flax.struct.field(pytree_node=False)
    in_axes: tuple[int, ...] = flax.struct.field(pytree_node=False)
    stacked: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def factor_specs(self, w_spec: str) -> tuple[str, str, str]:
        """(a's, b's, the rank's) einsum letters for a weight whose axes are named `w_spec`."""
        r = _fresh_letter(w_spec)
        stack = w_spec[:self.stacked]
        inputs = ''.join(w_spec[i] for i in self.in_axes)
        outputs = ''.join(c for i, c in enumerate(w_spec)
                          if i >= self.stacked and i not in self.in_axes)
        return stack + inputs + r, stack + r + outputs, r

    def contract(self, eqn: str, x: jax.Array) -> jax.Array:
        return contract(eqn, x, self.base) + self.update(eqn, x)

    def update(self, eqn: str, x: jax.Array) -> jax.Array:
        """The adapter's term of `contract`, scale · (x·a)·b, in x's dtype.

        Stacked factors (the FFN's gate and up) multiply one index at a time, as plain matrix
        products that `dot`'s kernels take: batched over the stacked axis, they went to XLA's
        CPU products, whose backward over [2, 512, 16384] copied the cotangent and ran at
        0.1 TFLOP/s (a 1 x 512 LoRA step at E4B widths: ~40 ms a layer against ~8).
        """
        if self.stacked:
            return contract_parts(eqn, x, self.a.shape[0],
                                  lambda i, part_eqn: self._factors_part(i).update(part_eqn, x))
        inputs, out_spec = eqn.split('->')
        x_spec, w_spec = inputs.split(',')
        a_spec, b_spec, r = self.factor_specs(w_spec)
        # x·a keeps x's free axes and the rank: [x free..., r].
        h_spec = ''.join(c for c in x_spec if c not in a_spec) + r
        # Both products in x's dtype, accumulated in float32 (`dot`), as peft under autocast
        # computes them (a float32 update [..., out]: 9% more temporaries in a LoRA step).
        # The scale multiplies the rank-r h, not the update: the backward pass then scales
        # [..., r] cotangents instead of making a scaled copy of the [..., out] one.
        h = dot(f'{x_spec},{a_spec}->{h_spec}', x, self.a.astype(x.dtype))
        h = (self.scale * h).astype(x.dtype)
        return dot(f'{h_spec},{b_spec}->{out_spec}', h, self.b.astype(x.dtype)).astype(x.dtype)

    def part(self, index: int) -> LoRAWeight:
        """The adapted weight at `index` of the first stacked axis (gating_einsum's gate or up),
        over `base.parts[index]` (a `StackedWeight` base) or the base's slice."""
        if self.stacked < 1:
            raise ValueError('part() takes an adapter of stacked weights.')
        stacked = isinstance(self.base, StackedWeight)
        return self._factors_part(index).replace(
            base=self.base.parts[index] if stacked else self.base[index])

    def _factors_part(self, index: int) -> LoRAWeight:
        """`part(index)`'s factors, without its base (None): enough for `update`."""
        return LoRAWeight(base=None, a=self.a[index], b=self.b[index], scale=self.scale,
                          in_axes=tuple(axis - 1 for axis in self.in_axes),
                          stacked=self.stacked - 1)

    def delta(self) -> jax.Array:
        """scale · a·b in the checkpoint order and shape, float32."""
        w_spec = ''.join(chr(ord('a') + i) for i in range(len(self.shape)))
        a_spec, b_spec, _ = self.factor_specs(w_spec.upper())
        product = jnp.einsum(f'{a_spec},{b_spec}->{w_spec.upper()}',
                             jnp.asarray(self.a, jnp.float32), jnp.asarray(self.b, jnp.float32))
        return self.scale * product

    def merge(self) -> jax.Array:
        """The base with the adapter folded in: float32 sum, stored back in the base's dtype.

        Merging needs the base as a plain checkpoint-order array: merge before converting a
        tree to the serving layout or int8 (`gemma3n.layout`), which then converts the result.
        """
        if isinstance(self.base, StoredWeight):
            raise ValueError(f'cannot merge a LoRA adapter into a {type(self.base).__name__}: '
                             'merge into the checkpoint-order weights, then convert them.')
        base = jnp.asarray(self.base)
        return (base.astype(jnp.float32) + self.delta()).astype(base.dtype)
