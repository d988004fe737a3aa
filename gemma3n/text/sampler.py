"""Token and text generation for a batch of prompts, on the generation engine (`gemma3n.engine`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n import validation
from gemma3n.layers import special_ids
from gemma3n.engine.engine import Engine
from gemma3n.engine.prefill import DEFAULT_PREFILL_CHUNK
from gemma3n.engine.sampling import Greedy, SamplingMethod
from gemma3n.sharding import ShardingRules
from gemma3n.text import media, special_tokens
from gemma3n.text.chat_format import add_image_markers
from gemma3n.text.generation import Generation, SamplerOutput, SamplerState
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
        mesh: Any = None,
        sharding_rules: ShardingRules = ShardingRules(),
    ):
        cache_length = validation.check_int('cache_length', cache_length, low=MIN_CACHE_LENGTH)
        max_out_length = validation.check_int('max_out_length', max_out_length, low=1)
        self.engine = Engine(model, params, per_layer_table=per_layer_table,
                             per_layer_table_on_host=per_layer_table_on_host,
                             forbidden_tokens=forbidden_tokens, prefill_chunk=prefill_chunk,
                             cache_dtype=cache_dtype, mesh=mesh, sharding_rules=sharding_rules)
        stop_tokens = self.engine.token_ids('stop_tokens', stop_tokens)
        self.model = model
        self.params = self.engine.params      # without the per-layer table when on the host
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.cache_length = cache_length
        self.max_out_length = max_out_length
        self.stop_tokens = tuple(stop_tokens.tolist())
        self.forbidden_tokens = self.engine.forbidden_tokens
        self.keep_default_stop_tokens = keep_default_stop_tokens
        self.cache_dtype = self.engine.cache_dtype
        self.prefill_chunk = self.engine.prefill_chunk

    @property
    def num_traces(self) -> dict[str, int]:
        """The engine's programs so far (`Engine.num_traces`)."""
        return self.engine.num_traces

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
        return self.engine.vision_encoder()

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
            raise ValueError(f'tokenizer {self.tokenizer.path} does not speak <start_of_image> '
                             f'and <end_of_image> as {special_ids.START_OF_IMAGE} and '
                             f'{special_ids.END_OF_IMAGE}, which '
                             'the SigLIP image blocks need: it cannot take images.')
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
        self.engine.audio_block()               # raises: no audio tower
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

