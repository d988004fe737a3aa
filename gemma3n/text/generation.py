"""One generation run of a `Sampler`: its checks, its step loop, and the records it returns."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n import cache as kv_cache
from gemma3n import multimodal, validation
from gemma3n.layers import special_ids
from gemma3n.text.prefill import check_memory
from gemma3n.text.sampling import SamplingMethod
from gemma3n.towers import check_audio

if TYPE_CHECKING:
    from gemma3n.text.sampler import Sampler

# What the compiled functions return instead of a token when a sequence's logits hold NaN/Inf.
NON_FINITE_LOGITS = -1


@dataclasses.dataclass
class SamplerState:
    """Where a batch of conversations stands, to continue it later.

    cache: the KV cache after the last call.
    pending: [B] the last token sampled for each sequence; it is not in the cache yet and is
        fed first when the conversation continues.
    """
    cache: dict[str, Any]
    pending: np.ndarray

    @property
    def positions_used(self) -> np.ndarray:
        """[B] positions each sequence occupies, the pending token included."""
        return np.asarray(self.cache[kv_cache.END_INDEX]) + 1


@dataclasses.dataclass
class SamplerOutput:
    """New tokens of one `sample_tokens` call.

    tokens: [B, N] new token ids (a stop token included), 0 after a sequence stopped.
    lengths: [B] number of new tokens of each sequence.
    logits: [B, N, V] the logits each new token was chosen from, when asked for.
    state: to continue the conversation (`sample_tokens(..., state=out.state)`).
    """
    tokens: np.ndarray
    lengths: np.ndarray
    logits: np.ndarray | None
    state: SamplerState


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Holds Ctrl-C (SIGINT) back until the block ends, then raises it as usual.

    A compiled step takes the KV cache (donated: its buffers are freed) and returns the next
    one; an interrupt raised between the two would leave no usable cache. Python runs signal
    handlers in the main thread only, so elsewhere there is nothing to hold back.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        previous(*caught[0])


class Generation:
    """One generation run: validates up front, then each iteration samples one token per sequence.

    Iterating yields the step's new tokens [B] (0 for sequences already stopped); `output()`
    then gives the `SamplerOutput`. Stopping the iteration early (a break, an exception,
    Ctrl-C) is allowed: the state then reflects the tokens sampled so far, which may be one
    step more than `delivered` when the interruption came during a step.
    """

    def __init__(self, sampler: Sampler, prompt_tokens: Any, max_new_tokens: int, *,
                 rng: jax.Array | int | None = None, state: SamplerState | None = None,
                 sampling: SamplingMethod | None = None, images: Any = None, audio: Any = None,
                 stop_tokens: Sequence[int] = (), keep_logits: bool = False):
        max_new_tokens = validation.check_int('max_new_tokens', max_new_tokens, low=1)
        self.rng = validation.as_rng(rng)
        if sampling is not None and not callable(sampling):
            raise TypeError(f'sampling must be a sampling method such as Greedy() or '
                            f'TopkSampling(k=40), got {type(sampling).__name__}.')
        vocab_size = sampler.model.config.num_embed
        self.stop = validation.token_ids('stop_tokens', stop_tokens, vocab_size)
        self.sampler = sampler
        rows = validation.prompt_rows(prompt_tokens, vocab_size, special_ids.IMAGE_MARKER_IDS)
        batch = len(rows)
        if state is not None:
            if kv_cache.is_deleted(state.cache):
                raise ValueError('state holds a KV cache that a later call already took over: a '
                                 'state continues once; continue from the state that call returned.')
            if state.pending.shape != (batch,):
                raise ValueError(f'state holds {state.pending.shape[0]} sequences, '
                                 f'the prompt {batch}.')
            rows = [np.concatenate([[p], row]).astype(np.int32)
                    for p, row in zip(state.pending, rows)]
            start = np.asarray(state.cache[kv_cache.END_INDEX])
        else:
            start = np.zeros(batch, np.int32)
        prompt_lengths = np.array([len(r) for r in rows])
        if audio is not None:
            audio = self._check_audio(sampler, audio, rows)
            _, num_soft = multimodal.audio_block(sampler.model.config)
            prompt_lengths = prompt_lengths + audio.num_clips * (
                multimodal.block_length(num_soft) - 1)
        if images is not None:
            images = self._check_images(sampler, images, rows)
            ids, num_soft = multimodal.image_block(sampler.model.config)
            prompt_lengths = prompt_lengths + images.shape[1] * (
                multimodal.block_length(num_soft) - 1)
            bidirectional = ids == multimodal.SIGLIP_IMAGE_IDS
            if bidirectional and sampler.prefill_chunk < num_soft:
                raise ValueError(f'prefill_chunk {sampler.prefill_chunk} cannot hold an image\'s '
                                 f'{num_soft} soft tokens (attended to together): use a larger '
                                 'one.')
        needed = start + prompt_lengths + max_new_tokens - 1
        if needed.max() > sampler.cache_length:
            b = int(needed.argmax())
            raise ValueError(
                f'sequence {b} needs {int(needed[b])} positions (cache already holding '
                f'{int(start[b])}, prompt {int(prompt_lengths[b])}'
                f'{" with image/audio blocks" if images is not None or audio is not None else ""}, '
                f'max_new_tokens {max_new_tokens}) but cache_length is {sampler.cache_length}.')
        check_memory(sampler.model.config, batch_size=batch,
                     longest_prompt=int(prompt_lengths.max()),
                     prefill_chunk=sampler.prefill_chunk, cache_length=sampler.cache_length,
                     dtype=sampler.cache_dtype, new_cache=state is None)
        self.cache = state.cache if state is not None else sampler.model.init_cache(
            batch_size=batch, dtype=sampler.cache_dtype, cache_length=sampler.cache_length)
        self.rows = rows
        self.max_new_tokens = max_new_tokens
        self.sampling = sampler.sampling if sampling is None else sampling
        self.images = images
        self.audio = audio
        self.keep_logits = keep_logits
        self.tokens = np.zeros((batch, 0), np.int32)
        self.lengths = np.zeros(batch, np.int32)
        self.done = np.zeros(batch, bool)
        self.logits: list[jax.Array] = []
        self.delivered = 0      # steps whose tokens the iteration has handed out

    @staticmethod
    def _check_images(sampler: Sampler, images: Any, rows: list[np.ndarray]) -> jax.Array:
        """Host-side checks the compiled prefill cannot make; returns images [B, N, H, W, C]."""
        block = multimodal.image_block(sampler.model.config) if sampler.model.has_vision else None
        if block is None:
            sampler.vision_encoder()            # raises: no vision
        counts = np.array([multimodal.count_image_markers(row, block[0].marker) for row in rows])
        return multimodal.check_images(images, counts, len(rows),
                                       sampler.model.image_channels())

    @staticmethod
    def _check_audio(sampler: Sampler, audio: Any, rows: list[np.ndarray]) -> Any:
        """Host-side checks of audio against the prompts; returns it as the model takes it."""
        block = multimodal.audio_block(sampler.model.config) if sampler.model.has_audio else None
        if block is None:
            raise ValueError('This model has no audio tower: audio cannot be passed.')
        counts = np.array([multimodal.count_image_markers(row, block[0].marker) for row in rows])
        return check_audio(audio, counts, len(rows), sampler.model.config.towers)

    def __iter__(self) -> Iterator[np.ndarray]:
        sampler = self.sampler
        for step in range(self.max_new_tokens):
            # The cache is handed to each compiled call and back: an interrupt waits until the
            # new cache and its token are recorded, so a stopped run still has a usable state.
            with _interrupts_deferred():
                if step:
                    fed = np.where(self.done, special_ids.PAD,
                                   self.tokens[:, -1]).astype(np.int32)
                    token, logits, self.cache = sampler._step(
                        sampler.params, jnp.asarray(fed), self.cache,
                        jax.random.fold_in(self.rng, step), sampler.per_layer_rows(fed[:, None]),
                        sampling=self.sampling)
                else:
                    # Every chunk of the prompt writes into the cache (sliding layers' rings
                    # cannot be rolled back), so an interrupt waits for the whole prefill.
                    token, logits, self.cache = sampler.prefill(
                        self.rows, self.cache, jax.random.fold_in(self.rng, 0), self.images,
                        self.sampling, self.audio)
                new = self._record(token, logits, step)
            self.delivered += 1
            yield new
            if self.done.all():
                return

    def _record(self, token: jax.Array, logits: jax.Array, step: int) -> np.ndarray:
        """Appends one step's tokens [B] (PAD for sequences already stopped); returns them."""
        new = np.where(self.done, special_ids.PAD, np.asarray(token)).astype(np.int32)
        self._check_finite(new, step)
        self.tokens = np.concatenate([self.tokens, new[:, None]], axis=1)
        if self.keep_logits:
            self.logits.append(logits)
        self.lengths += ~self.done
        self.done |= np.isin(new, self.stop) & (self.lengths > 0)
        return new

    def _check_finite(self, new: np.ndarray, step: int) -> None:
        broken = np.flatnonzero(new == NON_FINITE_LOGITS)
        if broken.size:
            raise FloatingPointError(
                f'the logits of sequence {int(broken[0])} became NaN/Inf at new token '
                f'{step + 1}: the weights hold NaN/Inf or the computation overflowed in '
                f'{jnp.dtype(self.sampler.model.dtype).name}; generation stopped.')

    def output(self) -> SamplerOutput:
        batch = len(self.rows)
        pending = self.tokens[np.arange(batch), np.maximum(self.lengths - 1, 0)]
        logits = (np.stack([np.asarray(x) for x in self.logits], axis=1)
                  if self.keep_logits else None)
        return SamplerOutput(tokens=self.tokens, lengths=self.lengths.copy(), logits=logits,
                             state=SamplerState(cache=self.cache, pending=pending))
