"""Chunked local self-attention of the audio conformer, with relative position logits.

The frames are cut into chunks of `W = chunk_size` queries. Each chunk reads a context of
`C = W + P + R` keys: the `P = context_left - 1` frames before the chunk, the chunk, and the
`R = context_right` frames after it. Query w of a chunk may read context key c when
`0 <= c - w <= P + R`, i.e. the keys from P frames before it to R frames after it, and only
keys of real (not padded) frames. The logit of a pair adds to q.k a position term
q.E[distance], where E projects a sinusoidal signal of the signed distance (query minus key,
from P down to -R) with `pos_proj`. Logits are soft-capped (`cap * tanh(logit / cap)`).

Masked pairs take the float32 minimum before the softmax, so a query with no readable key
(inside padding) averages its whole context uniformly, as the checkpoint's reference does; those
frames are zeroed at the encoder's output.

Example:
    >>> attn = LocalAttention(AudioConfig())
    >>> out = attn.apply({'params': p}, x, valid)     # [B, T, 1536], [B, T] -> [B, T, 8, 192]
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.audio.config import AudioConfig
from gemma3n.layers.projection import Projection
from gemma3n.layers.weights import declare

MIN_TIMESCALE = 1.0
MAX_TIMESCALE = 1.0e4
SOFTPLUS_ZERO = math.log(2.0)
QKV_AXES = ('audio_qkv', 'audio_embed')


def timing_signal(positions: np.ndarray, channels: int) -> jax.Array:
    """Sinusoidal signal [F, channels] of `positions` [F]: sines then cosines of geometric
    timescales from MIN_TIMESCALE to MAX_TIMESCALE, in float32."""
    num_timescales = channels // 2
    increment = math.log(MAX_TIMESCALE / MIN_TIMESCALE) / max(num_timescales - 1, 1)
    inv_timescales = MIN_TIMESCALE * jnp.exp(
        jnp.arange(num_timescales, dtype=jnp.float32) * -increment)
    scaled = jnp.asarray(positions, jnp.float32)[:, None] * inv_timescales[None, :]
    return jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=-1)


def context_indices(num_chunks: int, config: AudioConfig) -> np.ndarray:
    """[U, C] index of each chunk's context keys in the sequence padded by P before and
    R + W - 1 after (so every chunk, the last included, has a full context)."""
    return (np.arange(num_chunks)[:, None] * config.chunk_size
            + np.arange(config.context_size)[None, :])


def chunk_pair_offsets(config: AudioConfig) -> np.ndarray:
    """[W, C] offset c - w of context key c from query w of a chunk: P minus their distance."""
    return np.arange(config.context_size)[None, :] - np.arange(config.chunk_size)[:, None]


class RelativePositionEmbedding(nn.Module):
    """`pos_proj/w` [N * H, D]: the projected position signal, one row per distance."""
    config: AudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        """-> [F, N, H] with F = P + R + 1, row f for the distance P - f (query minus key)."""
        cfg = self.config
        distances = np.arange(cfg.max_past, -cfg.context_right - 1, -1)
        signal = timing_signal(distances, cfg.hidden_size)
        projected = Projection(cfg.num_heads * cfg.head_dim, QKV_AXES, self.dtype,
                               name='pos_proj')(signal)
        return projected.reshape(len(distances), cfg.num_heads, cfg.head_dim)


class LocalAttention(nn.Module):
    """Projections `q_proj`, `k_proj`, `v_proj` (`w` [N * H, D]), a learned per-dimension query
    scale `per_dim_scale` [H] (through softplus) and `relative_position_embedding`."""
    config: AudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        """x: [B, T, D], valid: bool [B, T] (False on padding) -> [B, T, N, H]."""
        cfg = self.config
        batch, length = x.shape[:2]
        heads = (batch, length, cfg.num_heads, cfg.head_dim)
        q = Projection(cfg.hidden_size, QKV_AXES, self.dtype, name='q_proj')(x).reshape(heads)
        k = Projection(cfg.hidden_size, QKV_AXES, self.dtype, name='k_proj')(x).reshape(heads)
        v = Projection(cfg.hidden_size, QKV_AXES, self.dtype, name='v_proj')(x).reshape(heads)
        per_dim_scale = declare(self, 'per_dim_scale', (cfg.head_dim,), ('audio_head_dim',),
                                nn.initializers.zeros, self.dtype)
        # softplus(0) = log 2 is divided out so a fresh (zero) per_dim_scale scales by H^-1/2.
        q = q * (cfg.head_dim ** -0.5 / SOFTPLUS_ZERO) * jax.nn.softplus(
            per_dim_scale.astype(jnp.float32)).astype(q.dtype)

        num_chunks = -(-length // cfg.chunk_size)
        tail = num_chunks * cfg.chunk_size - length
        q_chunks = jnp.pad(q, ((0, 0), (0, tail), (0, 0), (0, 0))).reshape(
            (batch, num_chunks, cfg.chunk_size) + heads[2:])                # [B, U, W, N, H]
        index = context_indices(num_chunks, cfg)                            # [U, C]
        context_pad = (cfg.max_past, cfg.context_right + cfg.chunk_size - 1)
        k_context = jnp.pad(k, ((0, 0), context_pad, (0, 0), (0, 0)))[:, index]  # [B, U, C, N, H]
        v_context = jnp.pad(v, ((0, 0), context_pad, (0, 0), (0, 0)))[:, index]
        valid_context = jnp.pad(valid, ((0, 0), context_pad))[:, index]    # [B, U, C]

        offsets = chunk_pair_offsets(cfg)                                   # [W, C]
        in_window = (offsets >= 0) & (offsets <= cfg.max_past + cfg.context_right)
        readable = valid_context[:, None, :, None, :] & in_window            # [B, 1, U, W, C]

        position = RelativePositionEmbedding(cfg, self.dtype, name='relative_position_embedding')()
        content = jnp.einsum('buwnh,bucnh->bnuwc', q_chunks, k_context)
        by_distance = jnp.einsum('buwnh,fnh->bnuwf', q_chunks, position.astype(q.dtype))
        # Pair (w, c) reads row f = c - w of the distance table; rows outside it are masked.
        rows = np.clip(offsets, 0, position.shape[0] - 1)
        by_pair = by_distance[:, :, :, np.arange(cfg.chunk_size)[:, None], rows]
        logits = (content + by_pair).astype(jnp.float32)
        logits = jnp.tanh(logits / cfg.logit_cap) * cfg.logit_cap
        logits = jnp.where(readable, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum('bnuwc,bucnh->buwnh', probs, v_context)
        return out.reshape((batch, num_chunks * cfg.chunk_size) + heads[2:])[:, :length]
