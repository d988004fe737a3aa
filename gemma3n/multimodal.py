"""Images (and audio) in the token stream: expand each marker into its block, merge soft tokens.

Each marker of the text (`<start_of_image>`, or `<start_of_audio>` for the released audio tower)
becomes the block
    "\\n\\n" <marker> [num_soft_tokens placeholders] <end> "\\n\\n"
whose placeholder embeddings are replaced by the projected soft tokens. Positions count the
inserted tokens. The ids of a block are a `BlockIds`: the seed's SigLIP model uses
`SIGLIP_IMAGE_IDS` (placeholders `IMAGE_PLACEHOLDER`, attended to bidirectionally within each
run); the released checkpoints' towers use the ids of their config.json (`gemma3n.towers_config`),
whose placeholders are ordinary vocabulary ids attended to causally, as `transformers` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.layers import special_ids

# Tokens around the placeholders: "\n\n", <start_of_image> before; <end_of_image>, "\n\n" after.
TOKENS_BEFORE_SOFT = 2
TOKENS_AFTER_SOFT = 2
IMAGES_RANKS = (4, 5)   # [B, H, W, C] (one image per sequence) or [B, N, H, W, C]


@dataclasses.dataclass(frozen=True)
class BlockIds:
    """The ids of one kind of block: the prompt's `marker`, the `placeholder` of each soft token,
    the `end` token after them."""
    marker: int
    placeholder: int
    end: int


SIGLIP_IMAGE_IDS = BlockIds(special_ids.START_OF_IMAGE, special_ids.IMAGE_PLACEHOLDER,
                            special_ids.END_OF_IMAGE)


@flax.struct.dataclass
class SoftTokens:
    """Images already encoded, for tokens already expanded (a prompt fed in chunks).

    embeddings: [B, N, T, D] each image's soft tokens in the text width (`encode_images`).
    block_start: [B, N] index of each image block's first token relative to this call's
        tokens: negative or past the end for blocks outside them.
    """
    embeddings: jax.Array
    block_start: jax.Array


def block_tokens(num_soft_tokens: int, ids: BlockIds = SIGLIP_IMAGE_IDS) -> np.ndarray:
    """The ids one marker expands into: [num_soft_tokens + 4]."""
    return np.array(
        [special_ids.DOUBLE_NEWLINE, ids.marker] + [ids.placeholder] * num_soft_tokens
        + [ids.end, special_ids.DOUBLE_NEWLINE], np.int32)


def block_length(num_soft_tokens: int) -> int:
    return num_soft_tokens + TOKENS_BEFORE_SOFT + TOKENS_AFTER_SOFT


def count_image_markers(tokens: np.ndarray, marker: int = special_ids.START_OF_IMAGE
                        ) -> np.ndarray:
    """[B, L] -> [B] number of `marker` tokens (`<start_of_image>`) of each sequence."""
    return np.sum(np.asarray(tokens) == marker, axis=-1)


def check_images(images: Any, marker_counts: np.ndarray | None, num_sequences: int,
                 channels: int) -> jax.Array:
    """Validates images for a batch of token sequences; returns them as [B, N, H, W, C].

    Args:
        images: uint8 (or float in [0, 255]) [B, H, W, C] or [B, N, H, W, C].
        marker_counts: [B] `<start_of_image>` markers per sequence, or None when the tokens
            are not known yet (inside a compiled function).
        num_sequences: B of the tokens.
        channels: the vision encoder's channel count.
    """
    if not hasattr(images, 'dtype'):
        images = np.asarray(images)
    if images.ndim not in IMAGES_RANKS:
        raise ValueError(f'images must be [B, H, W, C] or [B, N, H, W, C], got shape '
                         f'{tuple(images.shape)}.')
    if images.ndim == IMAGES_RANKS[0]:
        images = images[:, None]
    if not (images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
        raise ValueError(f'images must be uint8 (or float in [0, 255]), got {images.dtype}.')
    if images.shape[-1] != channels:
        raise ValueError(f'images must have {channels} channels, got shape '
                         f'{tuple(images.shape)}.')
    check_per_sequence('images are', images.shape[:2], num_sequences, marker_counts,
                       '<start_of_image>', 'image')
    return jnp.asarray(images)


def check_per_sequence(what: str, batch_shape: tuple[int, int], num_sequences: int,
                       marker_counts: np.ndarray | None, marker: str, item: str) -> None:
    """Media of `batch_shape` [B, N] (N items per sequence) against the tokens: B must be their
    `num_sequences`, and each sequence needs N `marker`s (`marker_counts` [B]; None: the tokens
    are not known yet). `what` is the media's name with its verb ('images are')."""
    batch, per_sequence = batch_shape
    if batch != num_sequences:
        raise ValueError(f'{what} for a batch of {batch} sequences, the tokens have '
                         f'{num_sequences}.')
    if marker_counts is not None and (np.asarray(marker_counts) != per_sequence).any():
        raise ValueError(
            f'each sequence needs one {marker} token per {item}: got {per_sequence} '
            f'{item}(s) per sequence but marker counts {np.asarray(marker_counts).tolist()}.')


def expand_tokens(tokens: jax.Array, num_images: int, num_soft_tokens: int,
                  ids: BlockIds = SIGLIP_IMAGE_IDS) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Expands the first `num_images` markers (`ids.marker`) of each sequence into blocks.

    Args:
        tokens: [B, L] ids with exactly `num_images` markers per sequence.
    Returns:
        expanded [B, L + num_images * (block - 1)] ids;
        text_index [B, L]: the expanded row whose output each original token gets. As in the
            reference (`remove_mm_logits`), a marker gets its block's first row (the leading
            "\\n\\n"), not the block's last one: what follows an image is read from the expanded
            sequence itself (`return_last_only`);
        block_start [B, num_images]: index of each image block's first token.
    """
    extra = block_length(num_soft_tokens) - 1
    is_marker = tokens == ids.marker
    markers_before = jnp.cumsum(is_marker, axis=-1) - is_marker            # [B, L]
    new_index = jnp.arange(tokens.shape[-1]) + extra * markers_before       # [B, L]
    length = tokens.shape[-1] + num_images * extra
    batch = jnp.arange(tokens.shape[0])[:, None]
    # Ordinary tokens move to new_index; markers are rewritten below as whole blocks.
    expanded = jnp.zeros((tokens.shape[0], length), tokens.dtype)
    expanded = expanded.at[batch, jnp.where(is_marker, length, new_index)].set(tokens, mode='drop')
    block_start = jax.vmap(lambda m, idx: idx[jnp.nonzero(m, size=num_images)[0]])(
        is_marker, new_index)                                               # [B, N]
    block = jnp.asarray(block_tokens(num_soft_tokens, ids), tokens.dtype)
    slots = block_start[:, :, None] + jnp.arange(block.shape[0])            # [B, N, block]
    expanded = expanded.at[batch[:, :, None], slots].set(block)
    return expanded, new_index, block_start


def expand_blocks(tokens: jax.Array, kinds: Sequence[tuple[int, int, BlockIds]]
                  ) -> tuple[jax.Array, jax.Array | None, list[jax.Array]]:
    """`expand_tokens` for each kind in turn (images, then audio).

    kinds: (blocks per sequence, soft tokens per block, ids) of each kind.
    Returns the expanded tokens, text_index [B, L] (None without kinds) and, per kind,
    block_start [B, count] in the fully expanded tokens.
    """
    text_index, starts = None, []
    for count, num_soft, ids in kinds:
        tokens, index, block_start = expand_tokens(tokens, count, num_soft, ids)
        # What earlier expansions placed moves again with the text around it.
        starts = [jnp.take_along_axis(index, start, axis=1) for start in starts] + [block_start]
        text_index = index if text_index is None else jnp.take_along_axis(index, text_index,
                                                                          axis=1)
    return tokens, text_index, starts


def merge_soft_tokens(x: jax.Array, soft: jax.Array, block_start: jax.Array) -> jax.Array:
    """Writes each image's soft tokens over its placeholders.

    x: [B, L', D] embeddings of the expanded tokens; soft: [B, N, T, D]; block_start: [B, N].
    Soft tokens whose slot lies outside [0, L') are dropped (blocks of other chunks).
    """
    batch = jnp.arange(x.shape[0])[:, None, None]
    slots = block_start[:, :, None] + TOKENS_BEFORE_SOFT + jnp.arange(soft.shape[2])
    length = x.shape[1]
    # Negative indices would wrap around: send them past the end, where 'drop' discards them.
    slots = jnp.where((slots >= 0) & (slots < length), slots, length)
    return x.at[batch, slots].set(soft.astype(x.dtype), mode='drop')


def bidirectional_visible_until(tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, L] the last position each token may attend to.

    Causal (its own position) except inside a run of placeholders, which all see the run's end.
    """
    is_soft = tokens == special_ids.IMAGE_PLACEHOLDER
    # Position of the run's last placeholder: a reverse cumulative max over run ends.
    run_end = is_soft & ~jnp.concatenate([is_soft[:, 1:], jnp.zeros_like(is_soft[:, :1])], axis=1)
    end_pos = jnp.where(run_end, positions, jnp.iinfo(jnp.int32).max)
    next_end = jax.lax.cummin(end_pos, axis=1, reverse=True)
    return jnp.where(is_soft, next_end, positions)


def image_block(config: Any) -> tuple[BlockIds, int] | None:
    """(ids, soft tokens per image) of the image blocks of a model of `config` (a
    `TransformerConfig`): SigLIP's, or the released towers' MobileNet-V5's; None without vision."""
    towers = config.towers
    if towers is not None and towers.vision is not None:
        return towers.image_ids, towers.image_soft_tokens
    if config.vision_encoder is not None:
        return SIGLIP_IMAGE_IDS, config.vision_encoder.num_mm_tokens_per_image
    return None


def ids_beyond_vocabulary(config: Any, text_only: bool, expanded: bool) -> tuple[int, ...]:
    """Ids beyond the text vocabulary a model's tokens may hold: the image markers, the
    placeholders of already `expanded` SigLIP blocks, every hard token of the released towers."""
    extra = special_ids.IMAGE_MARKER_IDS
    towers = None if text_only else config.towers
    if towers is not None:
        extra += (towers.image_ids.marker, towers.audio_ids.marker)
        extra += tuple(range(config.num_embed, towers.hard_token_end))
    if expanded and not text_only and config.vision_encoder is not None:
        extra += (special_ids.IMAGE_PLACEHOLDER,)
    return extra


def audio_block(config: Any) -> tuple[BlockIds, int] | None:
    """(ids, soft tokens per clip) of the audio blocks of a model of `config`; None without audio."""
    towers = config.towers
    if towers is None or towers.audio is None:
        return None
    return towers.audio_ids, towers.audio_soft_tokens
