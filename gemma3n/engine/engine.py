"""The generation engine: a model's compiled prefill and decode step, and the checks before them.

Everything that runs the model to generate goes through one `Engine`: the `Sampler` (a batch
decoded in lock-step), the `ChatSampler`, the server (sequences joining and leaving a batch of
slots, see `gemma3n.engine.batch`). The engine owns
- the compiled functions: a prefill chunk for the whole batch, a prefill chunk for one slot of
  a batched cache, one decode step for the first rows of a batched cache (one program per
  number of rows, compiled when first asked for), a slot's sequence moved to another slot,
  the image encoder;
- the input checks: prompt token ids (the one check, image markers allowed), images and audio
  (models with the released towers) against their markers, and the one rule for how long a
  prompt is once its image and audio blocks are expanded (`multimodal.image_block`,
  `multimodal.audio_block`);
- how a sampling method is applied: logits holding NaN/Inf give NON_FINITE_LOGITS instead of a
  token; forbidden tokens get -inf.

Example:
    >>> engine = Engine(model, params)
    >>> rows = engine.prompt_rows([[2, 17, 42], [2, 9]])
    >>> cache = engine.new_cache(2, cache_length=64)
    >>> token, logits, cache = engine.prefill(rows, cache, jax.random.key(0), None, Greedy())
    >>> token, logits, cache = engine.step(np.asarray(token), cache, jax.random.key(1), Greedy())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n import cache as kv_cache
from gemma3n import multimodal, validation
from gemma3n.embedder import holds_per_layer_table, per_layer_token_ids, split_per_layer_table
from gemma3n.exported_programs import ExportedJit
from gemma3n.layers import axes, special_ids
from gemma3n.engine.prefill import DEFAULT_PREFILL_CHUNK, check_memory, expand_rows, plan_chunks
from gemma3n.engine.sampling import SamplingMethod
from gemma3n.sharding import MeshConstraints, ShardingRules, mesh_of
from gemma3n.towers import check_audio

if TYPE_CHECKING:
    from gemma3n.transformer import Gemma3nTransformer

# What the compiled functions return instead of a token when a sequence's logits hold NaN/Inf.
NON_FINITE_LOGITS = -1


class Engine:
    """A model with its weights, ready to prefill and decode (see the module docstring).

    Args:
        per_layer_table: any `table[ids] -> rows` object (such as a `LazyPerLayerTable`) that
            holds the per-layer table instead of `params`, gathered on the host.
        per_layer_table_on_host: move the table out of `params` to the host.
        forbidden_tokens: ids never sampled.
        prefill_chunk: prompts go through the cache this many tokens at a time.
        cache_dtype: the KV cache's dtype (default: the model's).
    """

    def __init__(self, model: Gemma3nTransformer, params: Any, *, per_layer_table: Any = None,
                 per_layer_table_on_host: bool = False, forbidden_tokens: Sequence[int] = (),
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cache_dtype: Any = None,
                 mesh: Any = None, sharding_rules: ShardingRules = ShardingRules()):
        self.prefill_chunk = validation.check_int('prefill_chunk', prefill_chunk, low=1)
        self.model = model
        self.vocab_size = model.config.num_embed
        self.forbidden_tokens = tuple(self.token_ids('forbidden_tokens', forbidden_tokens).tolist())
        self.params = params
        # The per-layer table (E4B: 2.35B of its 6.8B text parameters) is only ever gathered
        # from: kept on the host, out of the compiled functions' arguments.
        self.host_table = per_layer_table
        if per_layer_table is not None and holds_per_layer_table(params):
            raise ValueError('per_layer_table was given but params also hold the table: load '
                             'them with skip_per_layer_table=True.')
        if per_layer_table_on_host:
            self.params, table = split_per_layer_table(params)
            self.host_table = np.asarray(table)
        self.cache_dtype = cache_dtype or model.dtype
        # On a mesh (given, or the one the params are placed on) the same programs run with
        # the cache's and the batch's shardings pinned (gemma3n.sharding.constraints).
        self.on_mesh = MeshConstraints(mesh if mesh is not None else mesh_of(params),
                                       sharding_rules)
        # The programs a run needs first are kept traced on disk (with a compilation cache).
        context = repr((model, self.forbidden_tokens))
        self._prefill = ExportedJit(self._prefill_fn, name='prefill', context=context,
                                    donate_argnames=('cache', 'logits'))
        self._prefill_slot = ExportedJit(self._prefill_slot_fn, name='prefill_slot',
                                         context=context, donate_argnames=('cache', 'logits'))
        self._step = ExportedJit(self._step_fn, name='step', context=context,
                                 donate_argnames=('cache',))
        self._move_slot = jax.jit(self._move_slot_fn, donate_argnames=('cache',))
        self._encode_images = jax.jit(lambda params, images: model.apply(
            {'params': params}, images, method=model.encode_images))
        self._encode_audio = jax.jit(lambda params, audio: model.apply(
            {'params': params}, audio, method=model.encode_audio))

    @property
    def num_traces(self) -> dict[str, int]:
        """How many programs each compiled function has needed (one per argument signature:
        traced, or read from disk)."""
        return {'prefill': self._prefill.programs + self._prefill_slot.programs,
                'step': self._step.programs}

    # ---- checks ----------------------------------------------------------------------------

    def token_ids(self, name: str, ids: Any) -> np.ndarray:
        """`ids` as int32, each in the vocabulary (see `validation.token_ids`)."""
        return validation.token_ids(name, ids, self.vocab_size)

    def prompt_rows(self, prompt_tokens: Any) -> list[np.ndarray]:
        """Prompts (see `validation.prompt_rows`) as int32 rows; image markers are allowed."""
        return validation.prompt_rows(prompt_tokens, self.vocab_size,
                                      special_ids.IMAGE_MARKER_IDS)

    def vision_encoder(self) -> Any:
        """The model's SigLIP vision encoder; a ValueError when the model has none."""
        encoder = self.model.config.vision_encoder
        if self.model.text_only or encoder is None:
            raise ValueError('This model does not have vision encoder: images cannot be passed.')
        return encoder

    def image_block(self) -> tuple[multimodal.BlockIds, int]:
        """(ids, soft tokens per image) of the model's image blocks; a ValueError without vision."""
        if not self.model.has_vision:
            self.vision_encoder()             # raises: no vision
        return multimodal.image_block(self.model.config)

    def audio_block(self) -> tuple[multimodal.BlockIds, int]:
        """(ids, soft tokens per clip) of the model's audio blocks; a ValueError without audio."""
        if not self.model.has_audio:
            raise ValueError('This model has no audio tower: audio cannot be passed (the '
                             'released Gemma 3n checkpoints have one).')
        return multimodal.audio_block(self.model.config)

    def check_images(self, images: Any, rows: list[np.ndarray]) -> jax.Array:
        """Images for the prompts `rows`, one per marker, as [B, N, H, W, C]."""
        ids, num_soft = self.image_block()
        counts = np.array([multimodal.count_image_markers(row, ids.marker) for row in rows])
        images = multimodal.check_images(images, counts, len(rows), self.model.image_channels())
        # SigLIP's placeholders attend to each other: a chunk must hold a whole run (the
        # released towers' are causal and may be cut).
        if ids == multimodal.SIGLIP_IMAGE_IDS and self.prefill_chunk < num_soft:
            raise ValueError(f'prefill_chunk {self.prefill_chunk} cannot hold an image\'s '
                             f'{num_soft} soft tokens (attended to together): use a larger one.')
        return images

    def check_audio(self, audio: Any, rows: list[np.ndarray]) -> Any:
        """Audio (an `AudioInput`) for the prompts `rows`, one clip per marker."""
        ids, _ = self.audio_block()
        counts = np.array([multimodal.count_image_markers(row, ids.marker) for row in rows])
        return check_audio(audio, counts, len(rows), self.model.config.towers)

    def prompt_positions(self, lengths: Any, num_images: int, num_clips: int = 0) -> np.ndarray:
        """Cache positions of prompts of `lengths` tokens [B] with `num_images` images and
        `num_clips` audio clips each: every marker becomes a block (`multimodal.block_length`)."""
        lengths = np.asarray(lengths)
        for count, block in ((num_images, self.image_block), (num_clips, self.audio_block)):
            if count:
                lengths = lengths + count * (multimodal.block_length(block()[1]) - 1)
        return lengths

    def check_room(self, start: np.ndarray, rows: list[np.ndarray], images: jax.Array | None,
                   max_new_tokens: int, cache_length: int, *, new_cache: bool,
                   audio: Any = None) -> None:
        """Refuses prompts `rows` (after `start` [B] positions already cached) that would not
        fit `cache_length` with `max_new_tokens` tokens each, or the memory available."""
        num_images = 0 if images is None else images.shape[1]
        num_clips = 0 if audio is None else audio.num_clips
        lengths = self.prompt_positions([len(row) for row in rows], num_images, num_clips)
        needed = start + lengths + max_new_tokens - 1
        if needed.max() > cache_length:
            b = int(needed.argmax())
            raise ValueError(
                f'sequence {b} needs {int(needed[b])} positions (cache already holding '
                f'{int(start[b])}, prompt {int(lengths[b])}'
                f'{" with image/audio blocks" if num_images or num_clips else ""}, '
                f'max_new_tokens {max_new_tokens}) but cache_length is {cache_length}.')
        check_memory(self.model.config, batch_size=len(rows), longest_prompt=int(lengths.max()),
                     prefill_chunk=self.prefill_chunk, cache_length=cache_length,
                     dtype=self.cache_dtype, new_cache=new_cache)

    # ---- the cache -------------------------------------------------------------------------

    def new_cache(self, batch_size: int, cache_length: int) -> kv_cache.Cache:
        """An empty KV cache for `batch_size` sequences (slots) of `cache_length` positions,
        made in place on the mesh."""
        make = lambda: self.model.init_cache(batch_size=batch_size, dtype=self.cache_dtype,
                                             cache_length=cache_length)
        shapes = jax.eval_shape(make)
        return jax.jit(make, out_shardings=self.on_mesh.shardings(
            shapes, kv_cache.cache_axes(shapes)))()

    @staticmethod
    def free_slot(cache: kv_cache.Cache, slot: int) -> kv_cache.Cache:
        """The cache with slot `slot` empty: its length set to 0 (its buffers are then unread)."""
        return {**cache, kv_cache.END_INDEX: cache[kv_cache.END_INDEX].at[slot].set(0)}

    def move_slot(self, cache: kv_cache.Cache, source: int, target: int) -> kv_cache.Cache:
        """The cache (donated) with slot `source`'s sequence in slot `target` and `source`
        empty: one program whatever the slots."""
        return self._move_slot(cache, jnp.int32(source), jnp.int32(target))

    def step_rows(self, needed: int, slots: int) -> int:
        """How many rows of a `slots`-row cache a decode step computes when its first `needed`
        rows hold the active sequences: the power of two at least `needed` (so that few programs
        compile), at most `slots`. On a mesh that splits the rows, all of them: the first rows
        alone would sit on the first devices."""
        mesh = self.on_mesh
        if mesh.mesh is not None and mesh.sharding((axes.BATCH,), (slots,)).spec[0] is not None:
            return slots
        return min(slots, 1 << max(needed - 1, 0).bit_length())

    # ---- compiled pieces -------------------------------------------------------------------

    def _choose(self, logits: jax.Array, rng: jax.Array, sampling: SamplingMethod) -> jax.Array:
        """[B, V] -> [B] tokens; NON_FINITE_LOGITS where a row holds NaN/Inf (checked before
        forbidden tokens get their -inf)."""
        finite = jnp.isfinite(logits).all(axis=-1)
        if self.forbidden_tokens:
            logits = logits.at[:, jnp.asarray(self.forbidden_tokens)].set(-jnp.inf)
        return jnp.where(finite, sampling(logits, rng), NON_FINITE_LOGITS)

    def _prefill_fn(self, params, tokens, cache, rng, soft_tokens, per_layer_rows, logits,
                    holds_last, sampling):
        """One prefill chunk; `logits` [B, V] keeps each sequence's from the chunk holding its
        last token (holds_last [B])."""
        out = self.model.apply({'params': params}, self._rows(tokens), cache=cache,
                               return_last_only=True, soft_tokens=soft_tokens,
                               per_layer_embeddings=per_layer_rows)
        logits = jnp.where(holds_last[:, None], out.logits, logits)
        return self._finish(self._choose(logits, rng, sampling), logits, out.cache)

    def _prefill_slot_fn(self, params, tokens, cache, slot, rng, soft_tokens, per_layer_rows,
                         logits, holds_last, sampling):
        """One prefill chunk [1, W] into row `slot` of a batched cache; the other rows are
        neither computed nor changed."""
        row = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1), cache)
        token, logits, row = self._prefill_fn(params, tokens, row, rng, soft_tokens,
                                              per_layer_rows, logits, holds_last, sampling)
        cache = jax.tree.map(lambda x, new: jax.lax.dynamic_update_slice_in_dim(x, new, slot, 0),
                             cache, row)
        return token, logits, self.on_mesh.constrain(cache, kv_cache.cache_axes(cache))

    def _step_fn(self, params, tokens, cache, rng, per_layer_rows, sampling):
        """One decode step of tokens [R] through the first R rows of the cache [S, ...], which
        is donated; the other rows are not computed. (The K/V writes are selects, one pass
        over each buffer in place, `cache.write`; with R below the cache's rows, writing the
        rows back still widens each buffer to float32 around the update, as XLA's CPU backend
        does for any partial write of a bfloat16 array.)"""
        rows = tokens.shape[0]
        part = jax.tree.map(lambda x: x[:rows], cache)
        out = self.model.apply({'params': params}, self._rows(tokens[:, None]), cache=part,
                               return_last_only=True, per_layer_embeddings=per_layer_rows)
        cache = jax.tree.map(lambda x, new: jax.lax.dynamic_update_slice_in_dim(x, new, 0, 0),
                             cache, out.cache)
        return self._finish(self._choose(out.logits, rng, sampling), out.logits, cache)

    def _move_slot_fn(self, cache, source, target):
        def move(x):
            return jax.lax.dynamic_update_slice_in_dim(
                x, jax.lax.dynamic_slice_in_dim(x, source, 1), target, 0)
        cache = jax.tree.map(move, cache)
        cache[kv_cache.END_INDEX] = cache[kv_cache.END_INDEX].at[source].set(0)
        return self.on_mesh.constrain(cache, kv_cache.cache_axes(cache))

    def _rows(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] split by rows over the mesh, as the cache is."""
        return self.on_mesh.constrain({'t': tokens}, {'t': (axes.BATCH, None)})['t']

    def _finish(self, token: jax.Array, logits: jax.Array, cache: kv_cache.Cache):
        """Token and logits whole for the host, the cache where the next call expects it."""
        token, logits = self.on_mesh.replicated((token, logits))
        return token, logits, self.on_mesh.constrain(cache, kv_cache.cache_axes(cache))

    def per_layer_rows(self, tokens: np.ndarray) -> np.ndarray | None:
        """Host-gathered per-layer table rows for tokens [B, L] (images expanded), or None
        without a host table."""
        if self.host_table is None:
            return None
        return self.host_table[per_layer_token_ids(tokens, self.vocab_size)]

    # ---- generation ------------------------------------------------------------------------

    def prefill(self, rows: list[np.ndarray], cache: kv_cache.Cache, rng: jax.Array,
                images: jax.Array | None, sampling: SamplingMethod, *, slot: int | None = None,
                audio: Any = None) -> tuple[jax.Array, jax.Array, kv_cache.Cache]:
        """Feeds the prompts `rows` (checked) through the cache `prefill_chunk` tokens at a time.

        images [B, N, H, W, C] and audio (an `AudioInput`) checked against `rows`: each kind's
        markers are expanded into blocks (images first) whose placeholders take its soft tokens.
        Without `slot`, row b of the cache takes rows[b]; with it, `rows` is one prompt and goes
        into that slot of the (larger) cache, the other slots untouched.
        Returns the first sampled token [B], the logits it was chosen from [B, V] and the cache.
        """
        kinds, encoded, starts = [], [], []
        if images is not None:
            ids, num_soft = self.image_block()
            kinds.append((images.shape[1], num_soft, ids))
            encoded.append(self._encode_images(self.params, images))
        if audio is not None:
            ids, num_soft = self.audio_block()
            kinds.append((audio.num_clips, num_soft, ids))
            encoded.append(self._encode_audio(self.params, audio))
        if kinds:
            rows, starts = expand_rows(rows, kinds)
        chunks = plan_chunks(rows, self.prefill_chunk)
        logits = jnp.zeros((len(rows), self.vocab_size), jnp.float32)
        for chunk in chunks:
            soft_tokens = tuple(
                multimodal.SoftTokens(soft, jnp.asarray(start - chunk.starts[:, None]))
                for soft, start in zip(encoded, starts)) or None
            args = (jnp.asarray(chunk.tokens), cache)
            if slot is not None:
                args += (jnp.int32(slot),)
            token, logits, cache = (self._prefill if slot is None else self._prefill_slot)(
                self.params, *args, rng, soft_tokens, self.per_layer_rows(chunk.tokens), logits,
                jnp.asarray(chunk.holds_last), sampling)
        return token, logits, cache

    def step(self, tokens: np.ndarray, cache: kv_cache.Cache, rng: jax.Array,
             sampling: SamplingMethod) -> tuple[jax.Array, jax.Array, kv_cache.Cache]:
        """One decode step: tokens [R] (PAD for a sequence that must not change) go into the
        first R rows of the cache (R at most its batch); returns the next tokens [R], their
        logits [R, V] and the cache (all its rows)."""
        tokens = np.asarray(tokens, np.int32)
        slots = cache[kv_cache.END_INDEX].shape[0]
        if not 1 <= len(tokens) <= slots:
            raise ValueError(f'a step takes 1 to {slots} tokens (the cache\'s rows), '
                             f'got {len(tokens)}.')
        return self._step(self.params, jnp.asarray(tokens), cache, rng,
                          self.per_layer_rows(tokens[:, None]), sampling)
