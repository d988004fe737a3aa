"""The Gemma 3n decoder: embeddings, AltUp streams, the block stack, the tied output head."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gemma3n import cache as kv_cache
from gemma3n import multimodal
from gemma3n.altup import match_rms
from gemma3n.attention import KVContext, LayerCall, QueryInfo, take_rows
from gemma3n.block import Block
from gemma3n.config import TransformerConfig
from gemma3n.embedder import Embedder
from gemma3n.layers import Einsum, RMSNorm, guard, special_ids
from gemma3n.layers.axes import EMBED, EMBED_PROJECTED
from gemma3n.model_inputs import (Inputs, check_combinations, check_tokens, flat_attention_mask,
                                  flat_per_layer_embeddings, token_positions)
from gemma3n.towers import AudioInput, ReleasedTowers, check_audio

KEY_REQUIRED = '__KEY_REQUIRED__'


@flax.struct.dataclass
class Output:
    """What the model returns.

    logits: [*B, L, V] float32, or [*B, V] with `return_last_only`. With images, a
        `<start_of_image>` position holds the output of the "\\n\\n" its block starts with.
    cache: the updated cache, or None when no cache was given.
    hidden_states: the final normed hidden states [*B, L, D] (or [*B, D]), on request.
    """
    logits: jax.Array
    cache: dict[str, Any] | None = None
    hidden_states: jax.Array | None = None


@flax.struct.dataclass
class ModelInfo:
    """Which tokenizer and default checkpoint go with a model class."""
    tokenizer_version: str | None = None
    default_ckpt: str | None = None


def last_valid_index(valid: jax.Array) -> jax.Array:
    """valid: [B, L] -> [B] index of the last True entry (0 if none)."""
    length = valid.shape[-1]
    return length - 1 - jnp.argmax(valid[:, ::-1], axis=-1)


class Gemma3nTransformer(nn.Module):
    """The Gemma 3n model (docs/architecture.md §1-§5): `apply(params, tokens, ...) -> Output`.

    Example:
        >>> model = Gemma3nTransformer(config=TransformerConfig.gemma3n(...), text_only=True)
        >>> params = model.init(jax.random.key(0), tokens)['params']
        >>> out = model.apply({'params': params}, tokens)          # out.logits: [B, L, V]
        >>> cache = model.init_cache(batch_size=1, dtype=jnp.float32, cache_length=64)
        >>> out = model.apply({'params': params}, tokens, cache=cache)  # out.cache: updated
    """
    config: TransformerConfig
    text_only: bool = False
    return_last_only: bool | None = None
    dtype: jnp.dtype = jnp.bfloat16
    # Recompute each block's activations in the backward pass instead of keeping them: training
    # memory grows with one block's activations, not all of them (costs one more forward).
    remat: bool = False
    # Names of batch entries, for config-driven training loops.
    tokens: str = KEY_REQUIRED
    images: str | None = None
    positions: str | None = None
    attention_mask: str | None = None

    INFO: ClassVar[ModelInfo] = ModelInfo()

    def setup(self):
        cfg = self.config
        if not cfg.use_altup or not cfg.per_layer_input_dim:
            raise ValueError('Gemma3nTransformer needs use_altup=True and per_layer_input_dim > 0.')
        self.vision_encoder = None if self.text_only else cfg.vision_encoder
        self.towers = (None if self.text_only or cfg.towers is None
                       else ReleasedTowers(cfg.towers, cfg.embed_dim))
        self.embedder = Embedder(
            vocab_size=cfg.num_embed, embed_dim=cfg.embed_dim, num_layers=cfg.num_layers,
            per_layer_dim=cfg.per_layer_input_dim,
            vision_dim=None if self.vision_encoder is None else self.vision_encoder.siglip_encoder.width,
            guard_precision=cfg.guard_against_excess_precision, dtype=self.dtype)
        num_extra = cfg.num_altup_inputs - 1
        d = cfg.embed_dim
        self.altup_projection = [
            Einsum((d, d), (EMBED, EMBED_PROJECTED), 0, 1, weight_name=f'altup_projection_{k}',
                   dtype=self.dtype)
            for k in range(num_extra)]
        self.altup_unembed_projection = [
            Einsum((d, d), (EMBED_PROJECTED, EMBED), 0, 1,
                   weight_name=f'altup_unembed_projection_{k}', dtype=self.dtype)
            for k in range(num_extra)]
        # LayerCall.ring is static pytree metadata, so a rematerialised block needs no
        # static arguments.
        block_class = nn.remat(Block) if self.remat else Block
        self.blocks = [block_class(config=cfg, layer_index=i, dtype=self.dtype,
                             name=f'layer_{i}')
                       for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(guard_precision=cfg.guard_against_excess_precision,
                                  dtype=self.dtype, axis_name=EMBED)

    def init_cache(self, *, batch_size: int, dtype: jnp.dtype = jnp.bfloat16,
                   cache_length: int) -> dict[str, Any]:
        """An empty compact KV cache (see `gemma3n.cache`)."""
        return kv_cache.init_cache(self.config, batch_size, dtype, cache_length)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        images: jax.Array | None = None,
        audio: AudioInput | None = None,
        positions: jax.Array | None = None,
        positions_offset: jax.Array | None = None,
        cache: dict[str, Any] | None = None,
        attention_mask: jax.Array | None = None,
        return_last_only: bool | None = None,
        return_hidden_states: bool | None = None,
        per_layer_embeddings: jax.Array | None = None,
        soft_tokens: multimodal.SoftTokens | None = None,
    ) -> Output:
        """Runs the model: `_prepare_inputs`, then `_run_blocks`, then `_head`.

        Args:
            tokens: int [*B, L]; 0 is padding (masked, not counted in positions).
            images: uint8 [B, H, W, C] (one per sequence) or [B, N, H, W, C], one image per
                `<start_of_image>` marker of each sequence (B = the flattened token batch). For
                the released towers' MobileNet-V5 they are already resized to its input size
                (`gemma3n.vision.mobilenet.preprocess.resize_image`).
            audio: log-mel frames of M clips per sequence, one per `<start_of_audio>` marker
                (models with the released audio tower; see `gemma3n.towers.AudioInput`).
            positions: optional [*B, L] positions (default: running count of non-padding
                tokens minus one); not with a cache, whose positions continue its own.
            positions_offset: optional [*B] added to the default positions (no cache).
            cache: from `init_cache`; the new K/V are written and `Output.cache` returned.
            attention_mask: optional bool [*B, L, L] replacing the default causal mask (no cache).
            return_last_only: logits of the last non-padding token only, [*B, V]; with images,
                of the expanded sequence (after a trailing marker: the prediction after the image).
            return_hidden_states: also return the final hidden states.
            per_layer_embeddings: optional [*B, L, num_layers, P] rows of the per-layer
                table for these tokens (after image expansion), gathered by the caller; then
                params may omit `embedder/per_layer_input_embedding`.
            soft_tokens: instead of images (and audio), their soft tokens from `encode_images`
                (`encode_audio`) for tokens [B, L] that are already expanded (see
                `multimodal.SoftTokens`; a tuple of them for several kinds): how a prompt is fed
                in chunks. With SigLIP the caller keeps each run of placeholders within one
                call, since attention inside it is bidirectional.
        """
        if return_last_only is None:
            return_last_only = bool(self.return_last_only)
        if isinstance(soft_tokens, multimodal.SoftTokens):
            soft_tokens = (soft_tokens,)
        inputs = self._prepare_inputs(
            tokens, images=images, audio=audio, positions=positions,
            positions_offset=positions_offset, cache=cache, attention_mask=attention_mask,
            per_layer_embeddings=per_layer_embeddings, soft_tokens=soft_tokens)
        streams, new_cache = self._run_blocks(inputs, cache, return_last_only)
        logits, hidden = self._head(streams, inputs, return_last_only)
        return Output(logits=logits, cache=new_cache,
                      hidden_states=hidden if return_hidden_states else None)

    def _prepare_inputs(self, tokens: Any, *, images: Any, audio: Any, positions: Any,
                        positions_offset: Any, cache: dict[str, Any] | None, attention_mask: Any,
                        per_layer_embeddings: Any, soft_tokens: tuple[multimodal.SoftTokens, ...]
                        | None) -> Inputs:
        """Checks the arguments of `__call__` (before anything heavy runs), expands the image
        and audio blocks and embeds the tokens: everything the blocks need, with the batch
        flattened."""
        check_combinations(has_vision=self.has_vision, has_audio=self.has_audio, images=images,
                           audio=audio, positions=positions, positions_offset=positions_offset,
                           cache=cache, attention_mask=attention_mask, soft_tokens=soft_tokens)
        tokens = check_tokens(tokens, self.config.num_embed, multimodal.ids_beyond_vocabulary(
            self.config, self.text_only, expanded=bool(soft_tokens)))
        batch_shape = tuple(tokens.shape[:-1])
        tokens = tokens.reshape(-1, tokens.shape[-1])                         # [B, L]
        batch = tokens.shape[0]
        tokens, text_index, blocks = self._expand_blocks(tokens, images, audio)
        if cache is not None and cache[kv_cache.END_INDEX].shape != (batch,):
            raise ValueError(f'cache is for batch {cache[kv_cache.END_INDEX].shape}, tokens '
                             f'have batch {batch}.')
        end_index = None if cache is None else cache[kv_cache.END_INDEX]
        length = tokens.shape[-1]
        valid = tokens != special_ids.PAD
        positions = token_positions(valid, batch_shape, positions, positions_offset, end_index)
        attention_mask = flat_attention_mask(attention_mask, batch_shape, batch, length)
        visible_until = positions
        # Only the seed's SigLIP blocks are bidirectional; the released towers' are causal.
        if self.vision_encoder is not None and (images is not None or soft_tokens):
            visible_until = multimodal.bidirectional_visible_until(tokens, positions)
        per_layer_embeddings = flat_per_layer_embeddings(
            per_layer_embeddings, batch_shape,
            (batch, length, self.config.num_layers, self.config.per_layer_input_dim))

        x = self.embedder.encode(tokens)                                      # [B, L, D]
        if self.towers is not None:
            x = self.towers.embed_ids(tokens, x)
        for media, block_start in blocks:
            soft = (self.encode_audio(media) if isinstance(media, AudioInput)
                    else self.encode_images(media))                           # [B, N, T, D]
            x = multimodal.merge_soft_tokens(x, soft, block_start)
        for soft in soft_tokens or ():
            x = multimodal.merge_soft_tokens(x, soft.embeddings, soft.block_start)
        if self.is_initializing() and self.towers is not None:
            self.towers.init_all(tokens)
        elif self.is_initializing() and self.vision_encoder is not None and not blocks:
            self._init_vision()
        return Inputs(
            embeddings=x,
            per_layer=self.embedder.per_layer_inputs(tokens, x, per_layer_embeddings),
            query=QueryInfo(positions=positions, visible_until=visible_until, valid=valid),
            attention_mask=attention_mask, end_index=end_index, text_index=text_index,
            batch_shape=batch_shape)

    def _expand_blocks(self, tokens: jax.Array, images: Any, audio: Any
                       ) -> tuple[jax.Array, jax.Array | None, list[tuple[Any, jax.Array]]]:
        """tokens [B, L] with their image, then audio, markers expanded into blocks (each
        checked against its markers first): (tokens, text_index [B, L] or None,
        [(images or audio, block_start [B, N])])."""
        cfg, batch = self.config, tokens.shape[0]
        counts = lambda ids: (None if isinstance(tokens, jax.core.Tracer)
                              else multimodal.count_image_markers(tokens, ids.marker))
        media, kinds = [], []
        if images is not None:
            ids, num_soft = multimodal.image_block(cfg)
            images = multimodal.check_images(images, counts(ids), batch, self.image_channels())
            media.append(images)
            kinds.append((images.shape[1], num_soft, ids))
        if audio is not None:
            ids, num_soft = multimodal.audio_block(cfg)
            audio = check_audio(audio, counts(ids), batch, cfg.towers)
            media.append(audio)
            kinds.append((audio.num_clips, num_soft, ids))
        tokens, text_index, starts = multimodal.expand_blocks(tokens, kinds)
        return tokens, text_index, list(zip(media, starts))

    def _run_blocks(self, inputs: Inputs, cache: dict[str, Any] | None, last_only: bool
                    ) -> tuple[jax.Array, dict[str, Any] | None]:
        """The AltUp fan-out and the block stack: -> (streams [A, B, L, D] ([A, B, 1, D] with
        `last_only`), the updated cache or None).

        KV-shared layers receive their source layer's context (docs/architecture.md §3).
        """
        cfg = self.config
        query, per_layer, user_mask = inputs.query, inputs.per_layer, inputs.attention_mask
        streams = self._fan_out(inputs.embeddings)                            # [A, B, L, D]
        ring_slots = None if cache is None else kv_cache.cache_length(cache)
        new_cache = None if cache is None else {kv_cache.END_INDEX: inputs.end_index + jnp.sum(
            query.valid, axis=-1, dtype=jnp.int32)}
        contexts: dict[int, KVContext] = {}
        sources = cfg.kv_source_layers()
        # Past the last layer that computes K/V, only the last token's output is ever read:
        # that layer computes K/V for every token and the rest for the last one only.
        last_owner = max(i for i in range(cfg.num_layers) if sources[i] == i)
        last = last_valid_index(query.valid)
        for i, block in enumerate(self.blocks):
            owns = sources[i] == i
            select = last_only and i == last_owner
            entry = None if cache is None or not owns else cache[kv_cache.layer_key(i)]
            call = LayerCall(
                shared_kv=None if owns else contexts[sources[i]], cache_entry=entry,
                end_index=inputs.end_index,
                ring=entry is not None and entry['k'].shape[1] < ring_slots,
                user_mask=user_mask, query_rows=last if select else None)
            streams, context, new_entry = block(streams, per_layer[:, :, i], query, call)
            if owns:
                contexts[i] = context
                if new_entry is not None:
                    new_cache[kv_cache.layer_key(i)] = new_entry
            if select:
                per_layer, query = take_rows(per_layer, last), query.take(last)
                user_mask = None if user_mask is None else take_rows(user_mask, last)
        return streams, new_cache

    def unembed(self, hidden: jax.Array, upcast: bool = True) -> jax.Array:
        """Final hidden states [..., L, D] -> float32 logits [..., L, V]: the tied unembedding
        and the soft cap. Reads only `embedder/input_embedding`, so a training loss can apply it
        to a chunk of tokens at a time (`gemma3n.training.loss.chunked_loss_sums`). With
        `upcast=False` and no soft cap, the logits as the product gives them (bfloat16 in a
        bfloat16 model), which the loss's kernel reads without a float32 copy."""
        logits = self.embedder.decode(hidden)
        if self.config.final_logit_softcap is None:
            return logits.astype(jnp.float32) if upcast else logits
        cap = self.config.final_logit_softcap
        return jnp.tanh(logits.astype(jnp.float32) / cap) * cap

    def _head(self, streams: jax.Array, inputs: Inputs, last_only: bool
              ) -> tuple[jax.Array, jax.Array]:
        """streams [A, B, L, D] -> (float32 logits [*B, L, V], final hidden states [*B, L, D]).

        The AltUp fan-in, the final norm, the tied unembedding and the soft cap; with
        `last_only` the one row per sequence ([*B, V], [*B, D]); with images, one row per
        input token (see `multimodal.expand_tokens`).
        """
        hidden = self.final_norm(self._fan_in(streams))
        logits = self.unembed(hidden)
        if last_only:
            logits, hidden = logits[:, 0], hidden[:, 0]
        elif inputs.text_index is not None:
            rows = inputs.text_index[:, :, None]
            logits = jnp.take_along_axis(logits, rows, axis=1)
            hidden = jnp.take_along_axis(hidden, rows, axis=1)
        return (logits.reshape(inputs.batch_shape + logits.shape[1:]),
                hidden.reshape(inputs.batch_shape + hidden.shape[1:]))

    @property
    def has_vision(self) -> bool:
        """Whether the model takes images (SigLIP, or the released towers' MobileNet-V5)."""
        return not self.text_only and multimodal.image_block(self.config) is not None

    @property
    def has_audio(self) -> bool:
        return not self.text_only and multimodal.audio_block(self.config) is not None

    def image_channels(self) -> int:
        towers = self.config.towers
        if towers is not None and towers.vision is not None:
            return towers.vision.in_channels
        return self.config.vision_encoder.image_channels

    def encode_images(self, images: jax.Array) -> jax.Array:
        """images uint8 [B, N, H, W, C] -> soft tokens in the text width [B, N, T, D] (float32)."""
        if self.towers is not None and self.config.towers.vision is not None:
            return self.towers.encode_images(images)
        if self.vision_encoder is None:
            raise ValueError('This model does not have vision encoder: images cannot be passed.')
        return self.embedder.encode_vision(self.vision_encoder(images))

    def encode_audio(self, audio: AudioInput) -> jax.Array:
        """Clips [B, M, T, F] -> soft tokens in the text width [B, M, audio_soft_tokens, D]."""
        if not self.has_audio:
            raise ValueError('This model has no audio tower: audio cannot be passed.')
        return self.towers.encode_audio(audio)

    def _init_vision(self) -> None:
        """Creates the vision parameters during `init` from a blank image."""
        enc = self.vision_encoder
        blank = jnp.zeros((1, 1, enc.image_height, enc.image_width, enc.image_channels), jnp.uint8)
        self.embedder.encode_vision(enc(blank))

    def _fan_out(self, x: jax.Array) -> jax.Array:
        """x [B, L, D] -> streams [A, B, L, D]: x and its projections rescaled to x's RMS."""
        extra = [match_rms(proj('BTD,DE->BTE', x), x) for proj in self.altup_projection]
        first = guard(x, self.config.guard_against_excess_precision)
        return jnp.stack([first] + extra)

    def _fan_in(self, streams: jax.Array) -> jax.Array:
        """streams [A, B, L, D] -> [B, L, D]: mean of stream 0 and the unprojected others."""
        first = streams[0]
        extra = [match_rms(proj('BTD,DE->BTE', s), first)
                 for proj, s in zip(self.altup_unembed_projection, streams[1:])]
        return jnp.mean(jnp.stack([first] + extra).astype(jnp.float32), axis=0).astype(first.dtype)
