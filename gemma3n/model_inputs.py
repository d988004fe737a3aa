"""The model's call arguments checked and made ready for the block stack, before any weight is
used: token ids, which arguments may come together, positions, the attention mask and the
caller's per-layer rows, all with the caller's batch dimensions *B flattened to B; and `Inputs`,
the record `Gemma3nTransformer` hands from its input preparation to its blocks and head.

Example:
    >>> tokens = check_tokens([[2, 651, 0]], num_embed=262144, extra_ids=())
    >>> token_positions(tokens != 0, (1,), None, None, None)           # [[0, 1, 1]]
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from gemma3n.attention import QueryInfo
from gemma3n.validation import token_ids


@flax.struct.dataclass
class Inputs:
    """A call's inputs made ready for the block stack (`Gemma3nTransformer._prepare_inputs`),
    the batch flattened to B and the image blocks expanded (L counts their tokens).

    embeddings: [B, L, D] token embeddings, images' soft tokens merged in.
    per_layer: [B, L, num_layers, P] each layer's per-layer input.
    query: positions, visibility and validity of the tokens.
    attention_mask: bool [B, L, L] replacing the default mask, or None.
    end_index: [B] the cache's positions written before this call, or None without a cache.
    text_index: [B, L_text] the expanded row each input token's output is read from, or None
        without images.
    batch_shape: the caller's batch dimensions *B, restored on the outputs.
    """
    embeddings: jax.Array
    per_layer: jax.Array
    query: QueryInfo
    attention_mask: jax.Array | None
    end_index: jax.Array | None
    text_index: jax.Array | None
    batch_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())


def check_tokens(tokens: Any, num_embed: int, extra_ids: tuple[int, ...]) -> jax.Array:
    """Validates token ids [*B, L] before anything is traced; returns them as an int32 array."""
    if isinstance(tokens, jax.core.Tracer):
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f'tokens must hold integer token ids, got dtype {tokens.dtype}.')
    else:
        tokens = token_ids('tokens', tokens, num_embed, extra_ids)
    if tokens.ndim < 1:
        raise ValueError(f'tokens must have shape [*B, L], got a scalar of shape {tokens.shape}.')
    if tokens.shape[-1] == 0:
        raise ValueError('tokens must hold at least one token (shape [*B, L] with L >= 1).')
    return jnp.asarray(tokens, jnp.int32)


def check_combinations(*, has_vision: bool, has_audio: bool, images: Any, audio: Any,
                       positions: Any, positions_offset: Any, cache: Any, attention_mask: Any,
                       soft_tokens: Any) -> None:
    """Refuses arguments of `Gemma3nTransformer.__call__` that cannot be given together (or
    to a model without the tower they need)."""
    if images is not None and not has_vision:
        raise ValueError('This model does not have vision encoder (text_only=True or no '
                         'vision tower in its config): images cannot be passed.')
    if audio is not None and not has_audio:
        raise ValueError('This model has no audio tower (text_only=True or none in its '
                         'config): audio cannot be passed.')
    if soft_tokens:
        if images is not None or audio is not None or not (has_vision or has_audio):
            raise ValueError('soft_tokens need a model with a vision or audio tower, and no '
                             'images or audio.')
        if positions is not None or attention_mask is not None:
            raise ValueError('positions and attention_mask cannot be combined with '
                             'soft_tokens.')
    if (images is not None or audio is not None) and (
            positions is not None or attention_mask is not None):
        raise ValueError('positions and attention_mask cannot be combined with images or '
                         'audio: their blocks change the sequence.')
    if cache is not None and (positions is not None or positions_offset is not None
                              or attention_mask is not None):
        raise ValueError('positions, positions_offset and attention_mask cannot be given '
                         'with a cache: cached calls continue the positions it holds.')


def token_positions(valid: jax.Array, batch_shape: tuple[int, ...], positions: Any,
                    positions_offset: Any, end_index: jax.Array | None) -> jax.Array:
    """valid [B, L] -> [B, L] int32 positions: the given ones ([*B, L]), or the running count
    of valid tokens (minus one) after the cache's `end_index` or `positions_offset` [*B]."""
    batch, length = valid.shape
    count = jnp.cumsum(valid, axis=-1, dtype=jnp.int32) - 1
    if end_index is not None:
        return end_index[:, None] + count
    if positions is None:
        if positions_offset is None:
            return count
        return count + jnp.reshape(jnp.asarray(positions_offset, jnp.int32), (batch, 1))
    if tuple(positions.shape) != batch_shape + (length,):
        raise ValueError(f'positions must have the shape of tokens {batch_shape + (length,)}, '
                         f'got {positions.shape}.')
    return jnp.reshape(positions, (batch, length)).astype(jnp.int32)


def flat_attention_mask(attention_mask: Any, batch_shape: tuple[int, ...], batch: int,
                        length: int) -> jax.Array | None:
    """attention_mask [*B, L, L] -> bool [B, L, L] (None stays None)."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != batch_shape + (length, length):
        raise ValueError(f'attention_mask must have shape [*B, L, L] = '
                         f'{batch_shape + (length, length)}, got {attention_mask.shape}.')
    return jnp.reshape(attention_mask, (batch, length, length)).astype(bool)


def flat_per_layer_embeddings(rows: Any, batch_shape: tuple[int, ...],
                              expected: tuple[int, int, int, int]) -> jax.Array | None:
    """The caller's per-layer table rows [*B, L, num_layers, P] -> `expected` [B, L,
    num_layers, P] (L after image expansion; None stays None)."""
    if rows is None:
        return None
    rows = jnp.reshape(rows, (-1,) + tuple(rows.shape[len(batch_shape):]))
    if rows.shape != expected:
        raise ValueError(f'per_layer_embeddings must have shape [*B, L, num_layers, P] = '
                         f'{expected} (L after image expansion), got {rows.shape}.')
    return rows
