"""The multimodal embedder: a tower's soft tokens, or its own hard token ids, into the text width.

    soft tokens [..., M] -> `soft_embedding_norm` -> `embedding_projection` [M -> D] -> RMS norm
    hard ids [...]       -> `embedding` row (id - vocab_offset) -> `hard_embedding_norm` -> same

The final norm has no scale. The checkpoint has one embedder per tower (`embed_audio`,
`embed_vision`) with this structure; the audio one reads ids from `AUDIO_VOCAB_OFFSET` on.

Example:
    >>> emb = MultimodalEmbedder.for_audio(AudioConfig(), text_hidden_size=2048)
    >>> params = init_params(emb, jax.random.key(0), ids, soft)
    >>> x = emb.apply({'params': params}, soft, method=MultimodalEmbedder.embed_soft)  # [B, S, 2048]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.audio.config import AudioConfig
from gemma3n.audio.weights import AudioRMSNorm, Projection, declare


class MultimodalEmbedder(nn.Module):
    """Embeds soft tokens [..., hidden_size] or hard ids in [vocab_offset, vocab_offset +
    vocab_size) into [..., text_hidden_size]."""
    vocab_size: int
    vocab_offset: int
    hidden_size: int
    text_hidden_size: int
    eps: float
    dtype: Any = jnp.float32

    @classmethod
    def for_audio(cls, config: AudioConfig, text_hidden_size: int,
                  dtype: Any = jnp.float32) -> 'MultimodalEmbedder':
        """The `embed_audio` embedder of an audio tower of `config`."""
        return cls(config.vocab_size, config.vocab_offset, config.hidden_size, text_hidden_size,
                   config.rms_norm_eps, dtype)

    def setup(self):
        self.embedding = declare(self, 'embedding', (self.vocab_size, self.hidden_size),
                                 ('mm_vocab', 'mm_embed'), nn.initializers.normal(1.0), self.dtype)
        self.hard_embedding_norm = AudioRMSNorm(self.eps, 'mm_embed', dtype=self.dtype)
        self.soft_embedding_norm = AudioRMSNorm(self.eps, 'mm_embed', dtype=self.dtype)
        self.embedding_projection = Projection(self.text_hidden_size, ('embed', 'mm_embed'),
                                               self.dtype)
        self.embedding_post_projection_norm = AudioRMSNorm(self.eps, with_scale=False)

    def _project(self, x: jax.Array) -> jax.Array:
        return self.embedding_post_projection_norm(self.embedding_projection(x))

    def embed_soft(self, soft: jax.Array) -> jax.Array:
        """soft: [..., hidden_size] -> [..., text_hidden_size]."""
        return self._project(self.soft_embedding_norm(soft.astype(self.dtype)))

    def embed_ids(self, ids: jax.Array) -> jax.Array:
        """ids: int [...] in [vocab_offset, vocab_offset + vocab_size) -> [..., text_hidden_size].

        Ids are only checked when concrete (outside a compiled function)."""
        if not isinstance(ids, jax.core.Tracer):
            low, high = int(jnp.min(ids)), int(jnp.max(ids))
            if low < self.vocab_offset or high >= self.vocab_offset + self.vocab_size:
                raise ValueError(
                    f'ids must lie in [{self.vocab_offset}, {self.vocab_offset + self.vocab_size})'
                    f', got values from {low} to {high}.')
        rows = jnp.take(self.embedding, ids - self.vocab_offset, axis=0)
        return self._project(self.hard_embedding_norm(rows))

    def __call__(self, ids: jax.Array, soft: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Both paths at once (and every weight, for `init`): (embed_ids(ids), embed_soft(soft))."""
        return self.embed_ids(ids), self.embed_soft(soft)
