"""Multi-turn chat: the conversation stays in the KV cache; each turn feeds only its new tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax

from gemma3n.text import special_tokens
from gemma3n.text.chat_format import format_continuation, format_user_turn
from gemma3n.text.prefill import DEFAULT_PREFILL_CHUNK
from gemma3n.text.sampler import (DEFAULT_CACHE_LENGTH, DEFAULT_MAX_OUT_LENGTH, Sampler,
                                  SamplerState)
from gemma3n.text.sampling import Greedy, SamplingMethod
from gemma3n.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from gemma3n.transformer import Gemma3nTransformer

# The answer of a turn ends with one of these; END_OF_TURN is kept in the history.
CHAT_STOP_TOKENS = (special_tokens.END_OF_TURN, special_tokens.EOS)


class ChatSampler:
    """A conversation with the model in Gemma's turn format.

    Each `chat` call feeds only the new user turn: earlier turns are already in the KV cache
    (no re-prefill). The answer stops at `<end_of_turn>`; an answer cut by `max_new_tokens` is
    closed with `<end_of_turn>` before the next turn.

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

    def reset(self) -> None:
        """Forgets the conversation (the next turn starts a new one)."""
        self.state = None
        self.turns = []

    @property
    def positions_used(self) -> int:
        """Cache positions the conversation occupies so far."""
        return 0 if self.state is None else int(self.state.positions_used[0])

    def turn_tokens(self, message: str) -> list[int]:
        """The token ids this turn feeds, given the conversation so far (pending token excluded)."""
        if self.state is None:
            return self.tokenizer.encode(format_user_turn(message), add_bos=True)
        ids = self.tokenizer.encode(format_continuation(message))
        if int(self.state.pending[0]) != special_tokens.END_OF_TURN:
            ids = [special_tokens.END_OF_TURN] + ids   # close an answer cut by max_new_tokens
        return ids

    def chat(
        self,
        message: str,
        *,
        images: Any = None,
        max_new_tokens: int | None = None,
        rng: jax.Array | int | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Sends one user message; returns the model's answer (or an iterator of its pieces).

        images: image files or [H, W, C] arrays shown with this message (markers are added in
        front of the message unless it has its own `<start_of_image>` markers).
        """
        if not self.multi_turn:
            self.reset()
        if images is not None:
            [message], images = self.sampler.prompt_images([message], images, single=True)
        ids = self.turn_tokens(message)
        if max_new_tokens is None:
            max_new_tokens = self.max_new_tokens
        try:
            run = self.sampler.generation(
                [ids], max_new_tokens, rng=rng, state=self.state,
                images=images, stop_tokens=CHAT_STOP_TOKENS)
        except ValueError as err:
            if self.state is not None and 'cache_length' in str(err):
                raise ValueError(
                    f'the conversation no longer fits the cache ({self.positions_used} of '
                    f'{self.sampler.cache_length} positions used): call reset() or use a larger '
                    f'cache_length. ({err})') from err
            raise
        pieces = self._answer(run, message)
        return pieces if stream else ''.join(pieces)

    def _answer(self, run, message: str) -> Iterator[str]:
        """Streams the answer's text, then records the turn and the new state."""
        answer = []
        for piece in self.sampler.stream_text(run):
            answer.append(piece)
            yield piece
        out = run.output()
        self.state = out.state
        self.last_answer_length = int(out.lengths[0])
        self.turns += [('user', message), ('model', ''.join(answer))]
