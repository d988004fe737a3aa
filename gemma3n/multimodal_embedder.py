"""Projection of a tower's soft tokens (or its own hard tokens) into the text embedding space.

Gemma 3n's released checkpoint has one such embedder per tower (`model.embed_vision.*`,
`model.embed_audio.*`, transformers' `Gemma3nMultimodalEmbedder`):

    soft tokens [..., W]  -> soft_embedding_norm (RMS, learned scale) -+
    hard ids    [...]     -> embedding[ids - vocab_offset] [..., W]     |
                          -> hard_embedding_norm (RMS, learned scale) -+-> embedding_projection
                             [W, D] -> embedding_post_projection_norm (RMS, no scale) -> [..., D]

Hard tokens are the tower's own `vocab_size` ids starting at `vocab_offset` in the text
vocabulary. The vision tower's soft tokens are multiplied by sqrt(W) before the norm
(`scale_soft_tokens`), which only matters through the norm's epsilon but is part of the result.

Example:
    >>> embedder = MultimodalEmbedder(vocab_size=128, vocab_offset=262144, width=2048,
    ...                               text_width=2048, scale_soft_tokens=True)
    >>> params = embedder.init(jax.random.key(0), soft_tokens)['params']
    >>> x = embedder.apply({'params': params}, soft_tokens)     # [B, 256, 2048] -> [B, 256, D]
    >>> x = embedder.apply({'params': params}, ids)             # int [B, L] -> [B, L, D]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.layers.norm import RMSNorm, rms_norm


class _Projection(nn.Module):
    """Linear map without bias. Params: `w` [W, features]."""
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[..., W]` -> `[..., features]`."""
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                       jnp.float32)
        return jnp.einsum("...w,wd->...d", x, w.astype(x.dtype))


class MultimodalEmbedder(nn.Module):
    """Soft tokens (floating) or hard token ids (integer) -> text-space embeddings `[..., D]`.

    Hard ids must lie in [vocab_offset, vocab_offset + vocab_size); others read NaN rows.

    Params: `embedding` [vocab_size, W]; `hard_embedding_norm/scale` [W];
    `soft_embedding_norm/scale` [W]; `embedding_projection/w` [W, D].
    """
    vocab_size: int
    vocab_offset: int
    width: int
    text_width: int
    scale_soft_tokens: bool = False

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Soft tokens `[..., W]` or ids `[...]` -> `[..., text_width]`."""
        table = self.param("embedding", nn.initializers.normal(1.0),
                           (self.vocab_size, self.width), jnp.float32)
        hard_norm = RMSNorm(name="hard_embedding_norm")
        soft_norm = RMSNorm(name="soft_embedding_norm")
        if jnp.issubdtype(inputs.dtype, jnp.integer):
            if self.is_initializing():          # declare the other path's weights too
                soft_norm(table[:1])
            rows = jnp.take(table, inputs - self.vocab_offset, axis=0, mode="fill",
                            fill_value=jnp.nan)
            x = hard_norm(rows)
        else:
            if inputs.shape[-1] != self.width:
                raise ValueError(f"soft tokens must be [..., {self.width}]; got shape "
                                 f"{tuple(inputs.shape)}")
            if self.is_initializing():
                hard_norm(table[:1])
            x = inputs * self.width ** 0.5 if self.scale_soft_tokens else inputs
            x = soft_norm(x)
        return rms_norm(_Projection(self.text_width, name="embedding_projection")(x))
