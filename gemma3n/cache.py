"""The compact KV cache: buffers only for layers that own K/V, sliding layers as ring buffers.

Layout (ours: the reference leaves it open; docs/architecture.md §4):
    cache = {
        'layer_{i}': {'k': [B, S_i, K, H], 'v': [B, S_i, K, H]},   # only for layers that own K/V
        'end_index': [B] int32,   # tokens written so far = the next position, per sequence
    }
A buffer's slot for the token at position p is p (a full buffer, S_i = cache_length) or
p mod W (a ring of W = sliding_window_size slots). Since each sequence's positions are
0, 1, 2, ... without gaps, `end_index` alone tells which position every slot holds, so no
per-slot bookkeeping is stored. An owner layer gets a full buffer when it is global or when
any global layer reads its K/V; local layers need only the last W positions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gemma3n.config import AttentionType, TransformerConfig
from gemma3n.layers import axes

Cache = dict[str, Any]
END_INDEX = 'end_index'
# Logical axes of a buffer [B, S, K, H] (slots are never split: a step writes anywhere in them).
BUFFER_AXES = (axes.BATCH, None, axes.KV_HEADS, axes.HEAD_DIM)
# end_index [B] stays whole on every device: the host reads it (every process, on a mesh that
# spans several), and each device computes it from the tokens alone.
END_INDEX_AXES = (None,)


def layer_key(i: int) -> str:
    return f'layer_{i}'


def cache_slots(config: TransformerConfig, cache_length: int) -> dict[int, int]:
    """Slots of each K/V-owning layer's buffer, for a cache of `cache_length` positions."""
    sources = config.kv_source_layers()
    full = {src for i, src in enumerate(sources) if config.attention_types[i] == AttentionType.GLOBAL}
    window = config.sliding_window_size or cache_length
    return {
        owner: cache_length if owner in full else min(window, cache_length)
        for owner in sorted(set(sources))
    }


def init_cache(
    config: TransformerConfig, batch_size: int, dtype: jnp.dtype, cache_length: int
) -> Cache:
    """An empty cache for `batch_size` sequences of up to `cache_length` positions."""
    if batch_size < 1 or cache_length < 1:
        raise ValueError(
            f'batch_size and cache_length must be positive, got {batch_size} and {cache_length}.')
    cache: Cache = {}
    for owner, slots in cache_slots(config, cache_length).items():
        shape = (batch_size, slots, config.num_kv_heads, config.head_dim)
        cache[layer_key(owner)] = {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
    cache[END_INDEX] = jnp.zeros((batch_size,), jnp.int32)
    return cache


def cache_axes(cache: Cache) -> dict[str, Any]:
    """The logical axes of every array of `cache`, in a tree of the same keys."""
    return {key: END_INDEX_AXES if key == END_INDEX else {name: BUFFER_AXES for name in entry}
            for key, entry in cache.items()}


def cache_length(cache: Cache) -> int:
    """The number of positions the cache can hold (its largest buffer)."""
    return max(entry['k'].shape[1] for key, entry in cache.items() if key != END_INDEX)


def cache_nbytes(cache: Cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))


def slot_positions(end_index: jax.Array, slots: int, ring: bool) -> tuple[jax.Array, jax.Array]:
    """Which position each slot holds, and whether it holds one yet.

    Args:
        end_index: [B] positions written so far.
        slots: buffer length S.
        ring: True for a ring buffer (slot = position mod S), else slot = position.
    Returns:
        positions [B, S] int32 and valid [B, S] bool.
    """
    slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
    end = end_index[:, None]
    if ring:
        # The newest position p < end with p ≡ slot (mod S).
        pos = end - 1 - jnp.mod(end - 1 - slot, slots)
        return pos, pos >= 0
    return jnp.broadcast_to(slot, (end_index.shape[0], slots)), slot < end


def write(buffer: jax.Array, new: jax.Array, positions: jax.Array, write_mask: jax.Array,
          ring: bool) -> jax.Array:
    """Writes new K or V [B, L, K, H] into buffer [B, S, K, H] at each token's slot.

    Tokens where write_mask [B, L] is False (padding, or tokens older than a ring keeps) are
    dropped: they get an out-of-range slot and `mode='drop'` discards them, so no two writes
    land on the same slot.
    """
    slots = buffer.shape[1]
    slot = jnp.mod(positions, slots) if ring else positions
    slot = jnp.where(write_mask, slot, slots)
    if new.shape[1] == 1:
        # One token (a decode step): a select over the slots. XLA's CPU backend widens a
        # bfloat16 buffer to float32 around a scatter, writes it whole and copies it into the
        # donated buffer (two passes); an elementwise select is one pass, in place, and stores
        # the same values (bench/cache_write.py).
        hit = jnp.arange(slots, dtype=slot.dtype)[None, :] == slot
        return jnp.where(hit[:, :, None, None], new.astype(buffer.dtype), buffer)
    # Mapped over the batch, the scatter names its batch axis, so on a mesh each device writes
    # its own rows (with rows picked by an index array, every row's write went to every device).
    return jax.vmap(lambda buf, row, at: buf.at[at].set(row, mode='drop'))(
        buffer, new.astype(buffer.dtype), slot)


def is_deleted(cache: Cache) -> bool:
    """Whether the cache's buffers were handed to a computation that took them over (donated)."""
    return any(isinstance(leaf, jax.Array) and leaf.is_deleted()
               for leaf in jax.tree_util.tree_leaves(cache))
