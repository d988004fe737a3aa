"""Projection of a tower's soft tokens (or its own hard tokens) into the text embedding space.

Gemma 3n's released checkpoint has one such embedder per tower (`model.embed_vision.*`,
`model.embed_audio.*`, transformers' `Gemma3nMultimodalEmbedder`):

    soft tokens [..., W] -> (x sqrt(W) for vision) -> soft_embedding_norm (RMS, learned scale) -+
    hard ids    [...]    -> embedding[ids - vocab_offset] [..., W] -> hard_embedding_norm ------+
                         -> embedding_projection [W -> D] -> embedding_post_projection_norm
                            (RMS, no scale) -> [..., D]

Hard tokens are the tower's own `vocab_size` ids starting at `vocab_offset` in the text
vocabulary. The vision tower's soft tokens are multiplied by sqrt(W) before the norm
(`scale_soft_tokens`), which only matters through the norm's epsilon but is part of the result.
Every weight is declared once with its logical axes, in the checkpoint's order
(`gemma3n.layers.weights`), so each maps by name onto the checkpoint's tensors.
`gemma3n.checkpoints.hf_mobilenet.vision_embedder` and `hf_audio.audio_embedder` build the two.

Example:
    >>> embedder = MultimodalEmbedder(vocab_size=128, vocab_offset=262144, width=2048,
    ...                               text_width=2048, scale_soft_tokens=True)
    >>> params = init_params(embedder, jax.random.key(0), ids, soft_tokens)
    >>> x = embedder.apply({'params': params}, soft_tokens,
    ...                    method=MultimodalEmbedder.embed_soft)     # [B, 256, 2048] -> [B, 256, D]
    >>> x = embedder.apply({'params': params}, ids,
    ...                    method=MultimodalEmbedder.embed_ids)      # int [B, L] -> [B, L, D]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.layers.norm import RMS_NORM_EPS, RMSNorm
from gemma3n.layers.projection import Projection
from gemma3n.layers.weights import declare

# Logical axes: the tower's width, its hard-token vocabulary, the text width.
WIDTH_AXIS, VOCAB_AXIS, TEXT_AXIS = 'mm_embed', 'mm_vocab', 'embed'


class MultimodalEmbedder(nn.Module):
    """Soft tokens `[..., width]` or hard ids in [vocab_offset, vocab_offset + vocab_size) ->
    `[..., text_width]`.

    Params: `embedding` [vocab_size, width]; `hard_embedding_norm/scale` [width];
    `soft_embedding_norm/scale` [width]; `embedding_projection/w` [text_width, width].
    """
    vocab_size: int
    vocab_offset: int
    width: int
    text_width: int
    eps: float = RMS_NORM_EPS
    scale_soft_tokens: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        self.embedding = declare(self, 'embedding', (self.vocab_size, self.width),
                                 (VOCAB_AXIS, WIDTH_AXIS), nn.initializers.normal(1.0), self.dtype)
        self.hard_embedding_norm = RMSNorm(eps=self.eps, axis_name=WIDTH_AXIS, dtype=self.dtype)
        self.soft_embedding_norm = RMSNorm(eps=self.eps, axis_name=WIDTH_AXIS, dtype=self.dtype)
        self.embedding_projection = Projection(self.text_width, (TEXT_AXIS, WIDTH_AXIS),
                                               self.dtype)
        self.embedding_post_projection_norm = RMSNorm(with_scale=False, eps=self.eps)

    def _project(self, x: jax.Array) -> jax.Array:
        return self.embedding_post_projection_norm(self.embedding_projection(x))

    def embed_soft(self, soft: jax.Array) -> jax.Array:
        """soft: [..., width] -> [..., text_width]."""
        if soft.shape[-1] != self.width:
            raise ValueError(f'soft tokens must be [..., {self.width}]; got shape '
                             f'{tuple(soft.shape)}.')
        x = soft.astype(self.dtype)
        if self.scale_soft_tokens:
            x = x * self.width ** 0.5
        return self._project(self.soft_embedding_norm(x))

    def embed_ids(self, ids: jax.Array) -> jax.Array:
        """ids: int [...] in [vocab_offset, vocab_offset + vocab_size) -> [..., text_width].

        Ids are checked when concrete; inside a compiled function an id outside reads a NaN row.
        """
        if not isinstance(ids, jax.core.Tracer):
            low, high = int(jnp.min(ids)), int(jnp.max(ids))
            if low < self.vocab_offset or high >= self.vocab_offset + self.vocab_size:
                raise ValueError(
                    f'ids must lie in [{self.vocab_offset}, {self.vocab_offset + self.vocab_size})'
                    f', got values from {low} to {high}.')
        rows = jnp.take(self.embedding, ids - self.vocab_offset, axis=0, mode='fill',
                        fill_value=jnp.nan)
        return self._project(self.hard_embedding_norm(rows))

    def __call__(self, ids: jax.Array, soft: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Both paths at once (and every weight, for `init`): (embed_ids(ids), embed_soft(soft))."""
        return self.embed_ids(ids), self.embed_soft(soft)
