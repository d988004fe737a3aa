"""Autoregressive generation with the compact KV cache: one compiled prefill, one compiled step."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n import multimodal, validation
from gemma3n.embedder import PER_LAYER_TABLE, per_layer_token_ids
from gemma3n.text import media, special_tokens
from gemma3n.text.chat_format import add_image_markers
from gemma3n.text.generation import NON_FINITE_LOGITS, Generation, SamplerOutput, SamplerState
from gemma3n.text.prefill import DEFAULT_PREFILL_CHUNK, expand_rows, plan_chunks
from gemma3n.text.sampling import Greedy, SamplingMethod
from gemma3n.text.tokenizer import StreamDecoder, Tokenizer
from gemma3n.vision.preprocess import load_images

if TYPE_CHECKING:
    from gemma3n.transformer import Gemma3nTransformer

DEFAULT_CACHE_LENGTH = 4096
DEFAULT_MAX_OUT_LENGTH = 256
MIN_CACHE_LENGTH = 2
# Text generation stops at these unless the sampler says otherwise (`keep_default_stop_tokens`).
DEFAULT_TEXT_STOP_TOKENS = (special_tokens.EOS, special_tokens.END_OF_TURN)


class Sampler:
    """Generates tokens (and, with a tokenizer, text) from a Gemma 3n model.

    Stop tokens: `sample_tokens` stops only at `stop_tokens` (none by default). Text generation
    (`sample`) stops at EOS and `<end_of_turn>` (DEFAULT_TEXT_STOP_TOKENS) and at `stop_tokens`;
    with `keep_default_stop_tokens=False`, at `stop_tokens` only (none: only the length limit
    ends it). Every id given must lie in the model's vocabulary.

    Logits that become NaN or Inf stop the generation with a FloatingPointError: no token is
    made up from them.

    Example:
        >>> sampler = Sampler(model=model, params=params, cache_length=256)
        >>> out = sampler.sample_tokens([[2, 17, 42], [2, 9]], max_new_tokens=8)
        >>> out.tokens.shape                                   # (2, 8)
        >>> more = sampler.sample_tokens([[5], [6]], 8, state=out.state)   # continues
    """

    def __init__(
        self,
        *,
        model: Gemma3nTransformer,
        params: Any,
        tokenizer: Tokenizer | None = None,
        sampling: SamplingMethod = Greedy(),
        cache_length: int = DEFAULT_CACHE_LENGTH,
        max_out_length: int = DEFAULT_MAX_OUT_LENGTH,
        stop_tokens: Sequence[int] = (),
        forbidden_tokens: Sequence[int] = (),
        cache_dtype: Any = None,
        per_layer_table_on_host: bool = False,
        per_layer_table: Any = None,
        keep_default_stop_tokens: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ):
        cache_length = validation.check_int('cache_length', cache_length, low=MIN_CACHE_LENGTH)
        max_out_length = validation.check_int('max_out_length', max_out_length, low=1)
        prefill_chunk = validation.check_int('prefill_chunk', prefill_chunk, low=1)
        vocab_size = model.config.num_embed
        stop_tokens = validation.token_ids('stop_tokens', stop_tokens, vocab_size)
        forbidden_tokens = validation.token_ids('forbidden_tokens', forbidden_tokens, vocab_size)
        self.model = model
        self.params = params
        # The per-layer table (E4B: 2.35B of its 6.8B text parameters) is only ever gathered
        # from: kept on the host, out of the compiled functions' arguments. `per_layer_table`
        # may be any `table[ids] -> rows` object, such as a `LazyPerLayerTable` that reads
        # only the rows it is asked for from the checkpoint file.
        self.host_table = per_layer_table
        if per_layer_table is not None and PER_LAYER_TABLE in params.get('embedder', {}):
            raise ValueError('per_layer_table was given but params also hold the table: load '
                             'them with skip_per_layer_table=True.')
        if per_layer_table_on_host:
            embedder = dict(params['embedder'])
            self.host_table = np.asarray(embedder.pop(PER_LAYER_TABLE))
            self.params = {**params, 'embedder': embedder}
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.cache_length = cache_length
        self.max_out_length = max_out_length
        self.stop_tokens = tuple(stop_tokens.tolist())
        self.forbidden_tokens = tuple(forbidden_tokens.tolist())
        self.keep_default_stop_tokens = keep_default_stop_tokens
        self.cache_dtype = cache_dtype or model.dtype
        # Prompts go through the cache this many tokens at a time (see gemma3n.text.prefill).
        self.prefill_chunk = prefill_chunk
        self.num_traces = {'prefill': 0, 'step': 0}   # how often each function compiled
        self._prefill = jax.jit(self._prefill_fn, static_argnames=('sampling',),
                                donate_argnames=('cache', 'logits'))
        self._encode_images = jax.jit(lambda params, images: model.apply(
            {'params': params}, images, method=model.encode_images))
        self._encode_audio = jax.jit(lambda params, audio: model.apply(
            {'params': params}, audio, method=model.encode_audio))
        self._step = jax.jit(self._step_fn, static_argnames=('sampling',),
                             donate_argnames=('cache',))

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
        self.num_traces['prefill'] += 1
        out = self.model.apply({'params': params}, tokens, cache=cache, return_last_only=True,
                               soft_tokens=soft_tokens, per_layer_embeddings=per_layer_rows)
        logits = jnp.where(holds_last[:, None], out.logits, logits)
        return self._choose(logits, rng, sampling), logits, out.cache

    def _step_fn(self, params, tokens, cache, rng, per_layer_rows, sampling):
        self.num_traces['step'] += 1
        out = self.model.apply({'params': params}, tokens[:, None], cache=cache,
                               return_last_only=True, per_layer_embeddings=per_layer_rows)
        return self._choose(out.logits, rng, sampling), out.logits, out.cache

    def per_layer_rows(self, tokens: np.ndarray) -> np.ndarray | None:
        """Host-gathered per-layer table rows for tokens [B, L] (images expanded), or None
        without a host table."""
        if self.host_table is None:
            return None
        return self.host_table[per_layer_token_ids(tokens, self.model.config.num_embed)]

    def prefill(self, rows: list[np.ndarray], cache: dict[str, Any], rng: jax.Array,
                images: jax.Array | None, sampling: SamplingMethod, audio: Any = None
                ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        """Feeds the prompts `rows` through the cache `prefill_chunk` tokens at a time.

        Returns the first sampled token [B], the logits it was chosen from [B, V] and the cache.
        """
        config, kinds, encoded = self.model.config, [], []
        if images is not None:
            ids, num_soft = multimodal.image_block(config)
            kinds.append((images.shape[1], num_soft, ids))
            encoded.append(self._encode_images(self.params, images))
        if audio is not None:
            ids, num_soft = multimodal.audio_block(config)
            kinds.append((audio.num_clips, num_soft, ids))
            encoded.append(self._encode_audio(self.params, audio))
        starts = []
        if kinds:
            rows, starts = expand_rows(rows, kinds)
        chunks = plan_chunks(rows, self.prefill_chunk)
        logits = jnp.zeros((len(rows), config.num_embed), jnp.float32)
        for chunk in chunks:
            soft_tokens = tuple(
                multimodal.SoftTokens(soft, jnp.asarray(start - chunk.starts[:, None]))
                for soft, start in zip(encoded, starts)) or None
            token, logits, cache = self._prefill(
                self.params, jnp.asarray(chunk.tokens), cache, rng, soft_tokens,
                self.per_layer_rows(chunk.tokens), logits, jnp.asarray(chunk.holds_last),
                sampling=sampling)
        return token, logits, cache

    # ---- token level -----------------------------------------------------------------------

    def sample_tokens(
        self,
        prompt_tokens: Any,
        max_new_tokens: int,
        *,
        rng: jax.Array | int | None = None,
        return_logits: bool = False,
        state: SamplerState | None = None,
        sampling: SamplingMethod | None = None,
        images: Any = None,
    ) -> SamplerOutput:
        """Generates up to `max_new_tokens` tokens after each prompt.

        Args:
            prompt_tokens: a list of token-id lists (ragged) or an int array [B, L]; one list
                of ids (or an array [L]) is one sequence (B = 1).
            max_new_tokens: tokens to generate per sequence (fewer if a stop token comes).
            rng: an int seed in [0, 2**32) or a JAX key (`jax.random.key`), for random
                sampling methods; None: seed 0.
            return_logits: also return the logits each token was chosen from.
            state: a previous call's `state`: the prompts are appended to its conversations.
            sampling: overrides the sampler's sampling method for this call.
            images: images for the prompts' `<start_of_image>` markers (see the model).
        """
        run = Generation(self, prompt_tokens, max_new_tokens, rng=rng, state=state,
                          sampling=sampling, images=images, stop_tokens=self.stop_tokens,
                          keep_logits=return_logits)
        for _ in run:
            pass
        return run.output()

    # ---- text level ------------------------------------------------------------------------

    def vision_encoder(self) -> Any:
        """The model's vision encoder; a ValueError when the model has none."""
        encoder = self.model.config.vision_encoder
        if self.model.text_only or encoder is None:
            raise ValueError('This model does not have vision encoder: images cannot be passed.')
        return encoder

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError('This sampler has no tokenizer: pass tokenizer= to use text.')
        return self.tokenizer

    def text_stop_tokens(self) -> tuple[int, ...]:
        """Stop tokens for text generation: DEFAULT_TEXT_STOP_TOKENS (unless the sampler was
        made with `keep_default_stop_tokens=False`) and the sampler's `stop_tokens`."""
        defaults = DEFAULT_TEXT_STOP_TOKENS if self.keep_default_stop_tokens else ()
        return tuple(dict.fromkeys(defaults + self.stop_tokens))

    def sample(
        self,
        prompt: str | Sequence[str],
        *,
        images: Any = None,
        audio: Any = None,
        max_new_tokens: int | None = None,
        sampling: SamplingMethod | None = None,
        rng: jax.Array | int | None = None,
        stream: bool = False,
    ) -> str | list[str] | Iterator[str]:
        """Text in, text out. BOS is added; generation stops at EOS or `<end_of_turn>`.

        images: for one prompt, a list of image files or [H, W, C] arrays (any sizes), or an
            array [N, H, W, C]; for a list of prompts, one such list per prompt, or an array
            [B, N, H, W, C]. A prompt without `<start_of_image>` markers gets one per image in
            front. With `stream=True` (a single prompt only) returns an iterator of text pieces
            as the tokens arrive; their concatenation equals the non-streaming result.
        audio: (models with the released audio tower) like images: audio files, 16 kHz sample
            arrays or (samples, sample_rate) pairs; a prompt without `<start_of_audio>`
            markers gets one per clip in front.
        """
        tokenizer = self._require_tokenizer()
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        prompts, images = self.prompt_images(prompts, images, single)
        prompts, audio = self.prompt_audio(prompts, audio, single)
        rows = [self.encode(p, add_bos=True) for p in prompts]
        if max_new_tokens is None:
            max_new_tokens = self.max_out_length
        run = Generation(self, rows, max_new_tokens, rng=rng,
                          state=None, sampling=sampling, images=images, audio=audio,
                          stop_tokens=self.text_stop_tokens(), keep_logits=False)
        if stream:
            if len(rows) != 1:
                raise ValueError('stream=True takes a single prompt.')
            return self.stream_text(run)
        for _ in run:
            pass
        out = run.output()
        texts = [tokenizer.decode(self.strip_stop(out.tokens[b, :out.lengths[b]]))
                 for b in range(len(rows))]
        return texts[0] if single else texts

    def prompt_images(self, prompts: list[str], images: Any, single: bool
                      ) -> tuple[list[str], jax.Array | None]:
        """Images for text prompts as [B, N, H, W, C], and the prompts with their markers."""
        if images is None:
            return prompts, None
        if single:
            images = [images]
        lists = isinstance(images, (list, tuple))
        counts = [1 if isinstance(items, (str, os.PathLike)) else len(items)
                  for items in images] if lists else None
        if lists and len(images) == len(prompts) and not any(counts):
            return prompts, None            # empty image lists: no images, on any model
        towers = self.model.config.towers
        released = self.model.has_vision and towers is not None
        encoder = None if released else self.vision_encoder()
        if not released and not self._require_tokenizer().has_image_tokens:
            raise ValueError(f'tokenizer {self.tokenizer.path} has no <start_of_image> piece: '
                             'it cannot take images.')
        if lists:
            if len(images) != len(prompts):
                raise ValueError(f'{len(images)} image lists for {len(prompts)} prompts.')
            if len(set(counts)) > 1:
                raise ValueError(f'the prompts have {counts} images: every prompt of a batch '
                                 'takes the same number of images.')
            images = jnp.stack([
                media.load_images(items, towers.vision.image_size) if released
                else load_images(items, encoder.image_height, encoder.image_width)
                for items in images])
        images = jnp.asarray(images)
        if images.ndim == 4:
            images = images[:, None]
        return [add_image_markers(p, images.shape[1]) for p in prompts], images

    def prompt_audio(self, prompts: list[str], audio: Any, single: bool
                     ) -> tuple[list[str], Any]:
        """Audio for text prompts as an `AudioInput`, and the prompts with their markers."""
        if audio is None:
            return prompts, None
        if not self.model.has_audio:
            raise ValueError('This model has no audio tower: audio cannot be passed (the '
                             'released Gemma 3n checkpoints have one).')
        lists = [audio] if single else list(audio)
        lists = [[items] if isinstance(items, (str, os.PathLike, np.ndarray, tuple)) else
                 list(items) for items in lists]
        if len(lists) != len(prompts):
            raise ValueError(f'{len(lists)} audio lists for {len(prompts)} prompts.')
        if not any(lists):
            return prompts, None
        clips = media.audio_input(lists)
        return [add_image_markers(p, clips.num_clips, special_tokens.START_OF_AUDIO_PIECE,
                                  'audio clips') for p in prompts], clips

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; with the released towers its `<start_of_image>` and
        `<start_of_audio>` markers become the model's marker ids (`gemma3n.text.media`)."""
        tokenizer = self._require_tokenizer()
        towers = None if self.model.text_only else self.model.config.towers
        if towers is None:
            return tokenizer.encode(text, add_bos=add_bos)
        return media.encode_prompt(tokenizer, text, towers, add_bos=add_bos)

    def strip_stop(self, ids: Sequence[int]) -> list[int]:
        """The ids without a final text stop token."""
        ids = [int(t) for t in ids]
        if ids and ids[-1] in self.text_stop_tokens():
            ids = ids[:-1]
        return ids

    def stream_text(self, run: 'Generation') -> Iterator[str]:
        """Yields the text of sequence 0 of `run` piece by piece as its tokens are sampled."""
        decoder = StreamDecoder(self._require_tokenizer())
        stops = self.text_stop_tokens()
        for tokens in run:
            token = int(tokens[0])
            if token in stops:
                break
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def generation(self, rows: Any, max_new_tokens: int, **kwargs: Any) -> 'Generation':
        """A step-by-step generation (iterate it for each step's tokens; then `.output()`).

        Takes the keyword arguments of `Generation`: rng, state, sampling, images, audio,
        stop_tokens, keep_logits.
        """
        return Generation(self, rows, max_new_tokens, **kwargs)

