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
from gemma3n import validation
from gemma3n.engine.batch import Batch
from gemma3n.engine.engine import NON_FINITE_LOGITS
from gemma3n.engine.sampling import SamplingMethod

if TYPE_CHECKING:
    from gemma3n.text.sampler import Sampler


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
        engine = sampler.engine
        self.stop = engine.token_ids('stop_tokens', stop_tokens)
        self.sampler = sampler
        rows = engine.prompt_rows(prompt_tokens)
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
        if images is not None:
            images = engine.check_images(images, rows)
        if audio is not None:
            audio = engine.check_audio(audio, rows)
        engine.check_room(start, rows, images, max_new_tokens, sampler.cache_length,
                          new_cache=state is None, audio=audio)
        self.batch = Batch(engine, state.cache if state is not None else engine.new_cache(
            batch, sampler.cache_length))
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

    def __iter__(self) -> Iterator[np.ndarray]:
        for step in range(self.max_new_tokens):
            # The cache is handed to each compiled call and back: an interrupt waits until the
            # new cache and its token are recorded, so a stopped run still has a usable state.
            with _interrupts_deferred():
                rng = jax.random.fold_in(self.rng, step)
                if step:
                    token, logits = self.batch.step(rng, self.sampling)
                else:
                    # Every chunk of the prompt writes into the cache (sliding layers' rings
                    # cannot be rolled back), so an interrupt waits for the whole prefill.
                    token, logits = self.batch.fill(self.rows, rng, self.sampling, self.images,
                                                   self.audio)
                new = self._record(token, logits, step)
            self.delivered += 1
            yield new
            if self.done.all():
                return

    def _record(self, new: np.ndarray, logits: jax.Array, step: int) -> np.ndarray:
        """Appends one step's tokens [B] (PAD for sequences already stopped); returns them."""
        self._check_finite(new, step)
        self.tokens = np.concatenate([self.tokens, new[:, None]], axis=1)
        if self.keep_logits:
            self.logits.append(logits)
        self.lengths += ~self.done
        self.done |= np.isin(new, self.stop) & (self.lengths > 0)
        for b in np.flatnonzero(self.done):
            self.batch.finish(b)
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
                             state=SamplerState(cache=self.batch.cache, pending=pending))
