"""Grouped-query attention with q/k/v norms, RoPE, sliding windows and cross-layer K/V sharing."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gemma3n import cache as kv_cache
from gemma3n.config import AttentionType, TransformerConfig
from gemma3n.layers import Einsum, RMSNorm, apply_rope, dot, guard
from gemma3n.layers.axes import EMBED, HEAD_DIM, KV, KV_HEADS, Q_HEADS

# Large negative logit for masked keys (finite, so a fully masked row stays NaN-free).
MASKED_LOGIT = -2.3819763e38


@flax.struct.dataclass
class QueryInfo:
    """Where the queries of one call sit.

    positions: [B, L] position of each token.
    visible_until: [B, L] largest key position each token may see (its own position, or the
        end of its image block: attention inside an image block is bidirectional).
    valid: [B, L] False for padding tokens.
    """
    positions: jax.Array
    visible_until: jax.Array
    valid: jax.Array

    def take(self, rows: jax.Array) -> QueryInfo:
        """Only the token at index rows[b] of each sequence b ([B]); L becomes 1."""
        return QueryInfo(positions=take_rows(self.positions, rows),
                         visible_until=take_rows(self.visible_until, rows),
                         valid=take_rows(self.valid, rows))


def take_rows(x: jax.Array, rows: jax.Array, batch_axis: int = 0) -> jax.Array:
    """x with its batch axis B at `batch_axis` and its token axis L right after it -> the token
    at index rows[b] ([B]) of each sequence; L becomes 1."""
    shape = [1] * x.ndim
    shape[batch_axis] = rows.shape[0]
    return jnp.take_along_axis(x, jnp.reshape(rows, shape), axis=batch_axis + 1)


@flax.struct.dataclass
class KVContext:
    """The keys a layer attends to: normed and rotated K/V plus each key's position.

    KV-shared layers receive their source layer's context unchanged.
    keys, values: [B, S, K, H]; key_positions: [B, S] int32; key_valid: [B, S] bool.
    """
    keys: jax.Array
    values: jax.Array
    key_positions: jax.Array
    key_valid: jax.Array


@flax.struct.dataclass
class LayerCall:
    """What one layer needs from the current call besides its input and `QueryInfo`: where its
    K/V come from and go to, the mask and which outputs are wanted. `Block` hands it on to
    `Attention` unchanged; every field keeps its default when the model runs without a cache.

    shared_kv: a KV-shared layer's source context (`KVContext`); None for a layer that owns K/V.
    cache_entry: this layer's cache buffers {'k', 'v'}: [B, S, K, H]; None without a cache
        (and always for KV-shared layers, which read their source's context).
    end_index: [B] positions each sequence had written before this call; None without a cache.
    ring: the buffer is a ring of sliding-window slots rather than one slot per position
        (static: it picks the code path).
    user_mask: bool [B, L, L] replacing the default causal mask; None for the default.
    query_rows: [B] index of the one token per sequence whose output is wanted: K/V (and the
        cache entry) still come from every token, everything else from that token only, and
        the outputs have L = 1. None: every token's output.
    """
    shared_kv: KVContext | None = None
    cache_entry: dict[str, jax.Array] | None = None
    end_index: jax.Array | None = None
    ring: bool = flax.struct.field(pytree_node=False, default=False)
    user_mask: jax.Array | None = None
    query_rows: jax.Array | None = None


def attention_mask(
    query: QueryInfo,
    context: KVContext,
    attn_type: AttentionType,
    window: int | None,
    user_mask: jax.Array | None = None,
) -> jax.Array:
    """[B, L, S] bool: which keys each query sees.

    Default: valid keys up to `visible_until` (causal, bidirectional within image blocks); a
    user-given mask replaces it. Sliding layers also need query_pos − W < key_pos < query_pos + W.
    """
    key_pos = context.key_positions[:, None, :]
    if user_mask is None:
        mask = context.key_valid[:, None, :] & (key_pos <= query.visible_until[:, :, None])
    else:
        mask = user_mask
    if attn_type == AttentionType.LOCAL_SLIDING:
        query_pos = query.positions[:, :, None]
        mask = mask & (key_pos > query_pos - window) & (key_pos < query_pos + window)
    return mask


class Attention(nn.Module):
    """Attention of one decoder layer.

    A layer that owns K/V projects, norms and rotates them (and writes them to its cache
    buffer); a KV-shared layer (`owns_kv=False`) has no K/V weights and attends with the
    `shared_kv` context of its source layer.

    Example:
        >>> attn = Attention(config=cfg, attn_type=AttentionType.GLOBAL, owns_kv=True)
        >>> out, context, _ = attn.apply(params, x, query)   # x: [B, L, D]
        >>> out, _, entry = attn.apply(params, x, query, LayerCall(cache_entry=entry,
        ...                                                        end_index=end_index))
    """
    config: TransformerConfig
    attn_type: AttentionType
    owns_kv: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        query: QueryInfo,
        call: LayerCall = LayerCall(),
    ) -> tuple[jax.Array, KVContext, dict[str, Any] | None]:
        """x: [B, L, D] -> (output [B, L, D], the K/V context used, the updated cache entry).

        With `call.query_rows` the queries come from one token per sequence and the output is
        [B, 1, D]; see `LayerCall` for the other fields.
        """
        cfg = self.config
        n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim
        guard_on = cfg.guard_against_excess_precision
        rope = dict(base_frequency=cfg.base_frequency(self.attn_type),
                    scale_factor=cfg.scale_factor(self.attn_type))

        x_q, q_info, user_mask = x, query, call.user_mask
        if call.query_rows is not None:
            x_q, q_info = take_rows(x, call.query_rows), query.take(call.query_rows)
            user_mask = None if user_mask is None else take_rows(user_mask, call.query_rows)
        q = Einsum((n, d, h), (Q_HEADS, EMBED, HEAD_DIM), 1, 2, dtype=self.dtype, name='q_einsum')('BTD,NDH->BTNH', x_q)
        if cfg.use_qk_norm:
            q = RMSNorm(with_scale=cfg.qk_norm_with_scale, guard_precision=guard_on,
                        dtype=self.dtype, axis_name=HEAD_DIM, name='query_norm')(q)
        q = apply_rope(q, q_info.positions, **rope)
        q = q * jnp.asarray(cfg.query_pre_attn_scalar(), q.dtype)

        new_entry = None
        if self.owns_kv:
            kv = Einsum((2, k, d, h), (KV, KV_HEADS, EMBED, HEAD_DIM), 2, 3, dtype=self.dtype, name='kv_einsum')('BSD,CKDH->CBSKH', x)
            keys, values = kv[0], kv[1]
            if cfg.use_qk_norm:
                keys = RMSNorm(with_scale=cfg.qk_norm_with_scale, guard_precision=guard_on,
                               dtype=self.dtype, axis_name=HEAD_DIM, name='key_norm')(keys)
            if cfg.use_value_norm:
                values = RMSNorm(with_scale=False, guard_precision=guard_on,
                                 dtype=self.dtype, name='value_norm')(values)
            keys = apply_rope(keys, query.positions, **rope)
            context = KVContext(keys, values, query.positions, query.valid)
            if call.cache_entry is not None:
                context, new_entry = _attend_through_cache(context, call.cache_entry,
                                                           call.end_index, call.ring)
        else:
            if call.shared_kv is None:
                raise ValueError('A KV-shared layer needs the K/V context of its source layer.')
            context = call.shared_kv

        mask = attention_mask(q_info, context, self.attn_type, cfg.sliding_window_size, user_mask)
        b, t = q.shape[:2]
        q = q.reshape(b, t, k, n // k, h)                                   # [B, T, K, G, H]
        logits = dot('BTKGH,BSKH->BKGTS', q, context.keys.astype(q.dtype))
        if cfg.attn_logits_soft_cap is not None:
            cap = cfg.attn_logits_soft_cap
            logits = jnp.tanh(logits / cap) * cap
        logits = guard(logits, guard_on).astype(jnp.float32)
        logits = jnp.where(mask[:, None, None, :, :], logits, MASKED_LOGIT)
        probs = jax.nn.softmax(logits, axis=-1).astype(context.values.dtype)
        encoded = dot('BKGTS,BSKH->BTKGH', probs, context.values)
        encoded = encoded.reshape(b, t, n, h).astype(x.dtype)
        out = Einsum((n, h, d), (Q_HEADS, HEAD_DIM, EMBED), (0, 1), 2, dtype=self.dtype, name='attn_vec_einsum')('BTNH,NHD->BTD', encoded)
        return out, context, new_entry


def _attend_through_cache(
    new: KVContext, entry: dict[str, jax.Array], end_index: jax.Array, ring: bool
) -> tuple[KVContext, dict[str, jax.Array]]:
    """Merges this call's K/V with a layer's cache buffer.

    A full buffer is written first and attended as a whole. A ring buffer cannot be written
    first (the chunk could overwrite keys its own first queries still need), so the queries
    attend to the old ring plus the new K/V, and only the newest ring-size tokens are stored.
    One token (a decode step) is the exception: the slot it takes holds position p - W, which
    its query at p does not see (the window is p - W < key <= p), so it writes first too; the
    buffer is then read only after it is written, and XLA writes it in place (reading the old
    ring too made it copy the ring).
    Returns the context to attend with and the updated entry.
    """
    slots = entry['k'].shape[1]
    positions, valid = new.key_positions, new.key_valid
    new_end = end_index + jnp.sum(valid, axis=-1, dtype=jnp.int32)
    if not ring or positions.shape[1] == 1:
        k_buf = kv_cache.write(entry['k'], new.keys, positions, valid, ring=ring)
        v_buf = kv_cache.write(entry['v'], new.values, positions, valid, ring=ring)
        slot_pos, slot_valid = kv_cache.slot_positions(new_end, slots, ring=ring)
        return KVContext(k_buf, v_buf, slot_pos, slot_valid), {'k': k_buf, 'v': v_buf}
    old_pos, old_valid = kv_cache.slot_positions(end_index, slots, ring=True)
    context = KVContext(
        jnp.concatenate([entry['k'].astype(new.keys.dtype), new.keys], axis=1),
        jnp.concatenate([entry['v'].astype(new.values.dtype), new.values], axis=1),
        jnp.concatenate([old_pos, positions], axis=1),
        jnp.concatenate([old_valid, valid], axis=1),
    )
    keep = valid & (positions >= new_end[:, None] - slots)
    entry = {'k': kv_cache.write(entry['k'], new.keys, positions, keep, ring=True),
             'v': kv_cache.write(entry['v'], new.values, positions, keep, ring=True)}
    return context, entry
