"""Token embeddings (tied with the output head), per-layer embeddings, and the vision projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.layers import Einsum, RMSNorm, contract, declare, lookup, projection_param
from gemma3n.layers.axes import EMBED, LAYERS, PER_LAYER, VISION_EMBED, VOCAB

INV_SQRT2 = 2 ** -0.5   # token-derived and table per-layer inputs are averaged in RMS
# Where the per-layer table lives in a model's params (the transformer names its Embedder
# `embedder`), declared once: the loaders, the layouts and the sampler all refer to it.
PER_LAYER_TABLE_PATH = 'embedder/per_layer_input_embedding'
EMBEDDER_SCOPE, PER_LAYER_TABLE = PER_LAYER_TABLE_PATH.split('/')
# The tied table: the input embedding and the output head.
EMBEDDING_TABLE_PATH = f'{EMBEDDER_SCOPE}/input_embedding'
# The tied table [V, D] read as the output head: V is its output axis, D its input axis. Stored
# [out, in] already, so the serving layout keeps its order; int8 serving quantizes it per row,
# which also serves the input side (`lookup`: a row's scale multiplies the gathered row).
EMBEDDING_IN_AXIS, EMBEDDING_OUT_AXIS = 1, 0


def per_layer_token_ids(tokens, vocab_size: int):
    """Rows of the per-layer table for tokens [B, L] (numpy or JAX): ids outside [0, V) read
    row 0 (image tokens and placeholders)."""
    where = np.where if isinstance(tokens, np.ndarray) else jnp.where
    return where((tokens >= 0) & (tokens < vocab_size), tokens, 0)


def holds_per_layer_table(params: dict) -> bool:
    """Whether the nested `params` of a model hold its per-layer table."""
    return PER_LAYER_TABLE in params.get(EMBEDDER_SCOPE, {})


def split_per_layer_table(params: dict) -> tuple[dict, jax.Array]:
    """(`params` less the per-layer table, the table): shallow copies, `params` is unchanged."""
    embedder = dict(params[EMBEDDER_SCOPE])
    table = embedder.pop(PER_LAYER_TABLE)
    return {**params, EMBEDDER_SCOPE: embedder}, table


class Embedder(nn.Module):
    """Maps token ids to vectors and final vectors to logits; builds the per-layer inputs.

    Params: `input_embedding` [V, D]; `per_layer_input_embedding` [V, num_layers, P];
    `per_layer_input_projection/w` [D, num_layers, P]; `per_layer_projection_norm/scale` [P];
    with a vision encoder also `mm_soft_embedding_norm/scale` [vision_dim] and
    `mm_input_projection/w` [vision_dim, D] (float32).

    The per-layer table (the largest array of E4B) may be left out of the params given to
    `apply` when the caller gathers its rows itself (`per_layer_inputs(..., gathered=...)`).

    Example:
        >>> emb = Embedder(vocab_size=300, embed_dim=16, num_layers=4, per_layer_dim=8)
        >>> x = emb.apply(params, tokens, method=Embedder.encode)       # [B, L, 16]
    """
    vocab_size: int
    embed_dim: int
    num_layers: int
    per_layer_dim: int
    vision_dim: int | None = None
    guard_precision: bool = False
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        v, d, n, p = self.vocab_size, self.embed_dim, self.num_layers, self.per_layer_dim
        # Fan-in init: rows of unit RMS after the √D input scaling.
        self.input_embedding = projection_param(
            self, 'input_embedding', (v, d), (VOCAB, EMBED), EMBEDDING_IN_AXIS, EMBEDDING_OUT_AXIS,
            self.dtype)
        if self.is_initializing() or self.has_variable('params', PER_LAYER_TABLE):
            # A lookup table, not a projection: P is its fan-in (rows of unit RMS after √P).
            self.per_layer_input_embedding = declare(
                self, PER_LAYER_TABLE, (v, n, p), (VOCAB, LAYERS, PER_LAYER),
                nn.initializers.normal(p ** -0.5), self.dtype, in_axes=(2,))
        else:
            self.per_layer_input_embedding = None
        self.per_layer_input_projection = Einsum(
            (d, n, p), (EMBED, LAYERS, PER_LAYER), 0, (1, 2), dtype=self.dtype)
        self.per_layer_projection_norm = RMSNorm(
            guard_precision=self.guard_precision, dtype=self.dtype, axis_name=PER_LAYER)
        if self.vision_dim is not None:
            self.mm_soft_embedding_norm = RMSNorm(scale_plus_one=True, dtype=jnp.float32,
                                                  axis_name=VISION_EMBED)
            self.mm_input_projection = Einsum((self.vision_dim, d), (VISION_EMBED, EMBED), 0, 1,
                                              dtype=jnp.float32)

    def encode(self, tokens: jax.Array) -> jax.Array:
        """tokens: [B, L] -> [B, L, D]: table rows times √D (ids outside the table clamp)."""
        x = lookup(self.input_embedding, tokens, self.dtype)
        return x * jnp.sqrt(jnp.float32(self.embed_dim)).astype(x.dtype)

    def per_layer_inputs(
        self, tokens: jax.Array, x: jax.Array, gathered: jax.Array | None = None
    ) -> jax.Array:
        """The per-layer inputs of every layer.

        Args:
            tokens: [B, L] ids.
            x: [B, L, D] token embeddings (image soft tokens merged in).
            gathered: optional [B, L, num_layers, P] rows of `per_layer_input_embedding` for
                `per_layer_token_ids(tokens)`, gathered by the caller (the table is not read).
        Returns:
            [B, L, num_layers, P].
        """
        if gathered is None:
            if self.per_layer_input_embedding is None:
                raise ValueError(
                    'params lack embedder/per_layer_input_embedding: pass the gathered '
                    'per-layer embeddings instead.')
            gathered = jnp.take(self.per_layer_input_embedding,
                                per_layer_token_ids(tokens, self.vocab_size), axis=0)
        table = gathered.astype(x.dtype) * jnp.sqrt(jnp.float32(self.per_layer_dim)).astype(x.dtype)
        projected = self.per_layer_input_projection('BTD,DNP->BTNP', x)
        projected = projected * jnp.asarray(self.embed_dim ** -0.5, projected.dtype)
        projected = self.per_layer_projection_norm(projected)
        return (projected + table) * jnp.asarray(INV_SQRT2, x.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> logits [B, L, V] with the tied table."""
        return contract('BTD,VD->BTV', x, self.input_embedding)

    def encode_vision(self, soft_tokens: jax.Array) -> jax.Array:
        """Vision soft tokens [B, N, T, vision_dim] -> text-width embeddings [B, N, T, D] (float32)."""
        normed = self.mm_soft_embedding_norm(soft_tokens.astype(jnp.float32))
        return self.mm_input_projection('BNTE,ED->BNTD', normed)
