"""Multi-turn chat: the conversation stays in the KV cache; each turn feeds only its new tokens."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from gemma3n import cache as kv_cache
from gemma3n.text import special_tokens
from gemma3n.text.chat_format import format_continuation, format_user_turn
from gemma3n.engine.prefill import DEFAULT_PREFILL_CHUNK
from gemma3n.text.sampler import (DEFAULT_CACHE_LENGTH, DEFAULT_MAX_OUT_LENGTH, Sampler,
                                  SamplerState)
from gemma3n.engine.sampling import Greedy, SamplingMethod
from gemma3n.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from gemma3n.transformer import Gemma3nTransformer

# The answer of a turn ends with one of these; END_OF_TURN is kept in the history.
CHAT_STOP_TOKENS = (special_tokens.END_OF_TURN, special_tokens.EOS)


class ConversationFull(ValueError):
    """The next turn does not fit the KV cache beside the conversation so far."""

    def __init__(self, positions_used: int, cache_length: int, detail: str):
        super().__init__(f'the conversation no longer fits the cache ({positions_used} of '
                         f'{cache_length} positions used): call reset() or use a larger '
                         f'cache_length. ({detail})')
        self.positions_used = positions_used
        self.cache_length = cache_length


class ChatSampler:
    """A conversation with the model in Gemma's turn format.

    Each `chat` call feeds only the new user turn: earlier turns are already in the KV cache
    (no re-prefill). The answer stops at `<end_of_turn>`; an answer cut by `max_new_tokens` is
    closed with `<end_of_turn>` before the next turn. So is a streamed answer the caller stops
    early (a break, dropping the iterator, Ctrl-C, the next `chat` call): the conversation keeps
    the tokens streamed so far.

    Example:
        >>> chat = ChatSampler(model=model, params=params, tokenizer=tokenizer)
        >>> chat.chat('Name a colour.')
        'Blue.'
        >>> chat.chat('Another one?')            # sees the first turn through the cache
        >>> chat.reset()                         # forget the conversation
    """

    def __init__(
        self,
        *,
        model: Gemma3nTransformer,
        params: Any,
        tokenizer: Tokenizer,
        multi_turn: bool = True,
        sampling: SamplingMethod = Greedy(),
        cache_length: int = DEFAULT_CACHE_LENGTH,
        max_new_tokens: int = DEFAULT_MAX_OUT_LENGTH,
        forbidden_tokens: tuple[int, ...] = (),
        per_layer_table: Any = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ):
        self.sampler = Sampler(model=model, params=params, tokenizer=tokenizer,
                               sampling=sampling, cache_length=cache_length,
                               max_out_length=max_new_tokens, stop_tokens=CHAT_STOP_TOKENS,
                               forbidden_tokens=forbidden_tokens, per_layer_table=per_layer_table,
                               prefill_chunk=prefill_chunk)
        self.tokenizer = tokenizer
        self.multi_turn = multi_turn
        self.max_new_tokens = max_new_tokens
        self.state: SamplerState | None = None
        self.turns: list[tuple[str, str]] = []
        self.last_answer_length = 0      # tokens of the last answer, its stop token included
        # The answer not streamed to its end yet, weakly: a caller dropping it closes it.
        self._streaming: weakref.ref | None = None

    def reset(self) -> None:
        """Forgets the conversation (the next turn starts a new one)."""
        self._end_streaming()
        self.state = None
        self.turns = []

    def _end_streaming(self) -> None:
        # Its tokens so far end its turn (see `_end_turn`); the next turn starts from there.
        pieces = self._streaming and self._streaming()
        if pieces is not None:
            pieces.close()

    @property
    def positions_used(self) -> int:
        """Cache positions the conversation occupies so far."""
        return 0 if self.state is None else int(self.state.positions_used[0])

    def turn_tokens(self, message: str) -> list[int]:
        """The token ids this turn feeds, given the conversation so far (pending token excluded)."""
        if self.state is None:
            return self.sampler.encode(format_user_turn(message), add_bos=True)
        ids = self.sampler.encode(format_continuation(message))
        if int(self.state.pending[0]) != special_tokens.END_OF_TURN:
            ids = [special_tokens.END_OF_TURN] + ids   # close an answer cut by max_new_tokens
        return ids

    def chat(
        self,
        message: str,
        *,
        images: Any = None,
        audio: Any = None,
        max_new_tokens: int | None = None,
        rng: jax.Array | int | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Sends one user message; returns the model's answer (or an iterator of its pieces).

        images: image files or [H, W, C] arrays shown with this message (markers are added in
        front of the message unless it has its own `<start_of_image>` markers).
        audio: audio files or 16 kHz sample arrays heard with this message (models with the
        released audio tower; `<start_of_audio>` markers as for images).
        """
        self._end_streaming()
        if not self.multi_turn:
            self.reset()
        if self.state is not None and kv_cache.is_deleted(self.state.cache):
            raise RuntimeError('the conversation was lost: an answer failed after the model had '
                               'taken over its KV cache. Call reset() to start over.')
        if images is not None:
            [message], images = self.sampler.prompt_images([message], images, single=True)
        if audio is not None:
            [message], audio = self.sampler.prompt_audio([message], audio, single=True)
        ids = self.turn_tokens(message)
        if max_new_tokens is None:
            max_new_tokens = self.max_new_tokens
        try:
            run = self.sampler.generation(
                [ids], max_new_tokens, rng=rng, state=self.state,
                images=images, audio=audio, stop_tokens=CHAT_STOP_TOKENS)
        except ValueError as err:
            if self.state is not None and 'cache_length' in str(err):
                raise ConversationFull(self.positions_used, self.sampler.cache_length,
                                       str(err)) from err
            raise
        pieces = self._answer(run, message)
        if not stream:
            return ''.join(pieces)
        self._streaming = weakref.ref(pieces)
        return pieces

    def _answer(self, run, message: str) -> Iterator[str]:
        """Streams the answer's text; however it ends, records the turn and the new state."""
        try:
            yield from self.sampler.stream_text(run)
        finally:
            self._end_turn(run, message)

    def _end_turn(self, run, message: str) -> None:
        """The conversation after `run`: its delivered tokens end the turn.

        A token sampled but never handed out (the run was interrupted during its step) is
        replaced by `<end_of_turn>`: it is the pending token, not yet in the cache.
        """
        self._streaming = None
        self.last_answer_length = 0
        if run.tokens.shape[1] == 0:
            return      # stopped before the prompt went in: the conversation is as it was
        out = run.output()
        if kv_cache.is_deleted(out.state.cache):
            return      # the model failed holding the cache: `chat` reports the loss
        pending = out.state.pending
        if run.delivered < run.tokens.shape[1]:
            pending = np.full_like(pending, special_tokens.END_OF_TURN)
        self.state = SamplerState(cache=out.state.cache, pending=pending)
        answer = run.tokens[0, :min(run.delivered, int(out.lengths[0]))]
        self.last_answer_length = len(answer)
        self.turns += [('user', message),
                       ('model', self.tokenizer.decode(self.sampler.strip_stop(answer)))]
