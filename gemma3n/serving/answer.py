"""One answer as it streams: token ids to text, stop strings, and the OpenAI objects that carry it.

Example:
    >>> answer = Answer(tokenizer, stop=['\\n\\n'], stop_tokens=(1, 106))
    >>> answer.push(token_id)          # the text it releases ('' while a stop string may begin)
    >>> answer.finish_reason           # None until a stop string was seen
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from gemma3n.text.tokenizer import StreamDecoder, Tokenizer

STOP, LENGTH = 'stop', 'length'
CHAT_KIND, COMPLETION_KIND = 'chat.completion', 'text_completion'


class Answer:
    """Text of one answer, released as soon as no stop string can still begin in it.

    tokens: ids taken so far (a stop token included); finish_reason: 'stop' once a stop string
    was found, its text and everything after it withheld.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str], stop_tokens: tuple[int, ...]):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = stop
        self.stop_tokens = stop_tokens
        self.held = ''
        self.tokens = 0
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        self.tokens += 1
        if token in self.stop_tokens:
            return ''
        return self._release(self.decoder.push(token))

    def flush(self) -> str:
        """The text still held when the answer ends."""
        text = self._release(self.decoder.flush())
        if self.finish_reason is None:
            text, self.held = text + self.held, ''
        return text

    def _release(self, text: str) -> str:
        if self.finish_reason is not None:
            return ''
        text = self.held + text
        found = [text.find(s) for s in self.stop if s in text]
        if found:
            self.finish_reason, self.held = STOP, ''
            return text[:min(found)]
        # Hold back the longest end of the text that begins a stop string.
        keep = max((n for s in self.stop for n in range(1, len(s))
                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ''
        return text[:len(text) - keep]


class Reply:
    """The OpenAI objects of one request: a whole response or stream chunks, and usage."""

    def __init__(self, kind: str, model: str, prompt_tokens: int):
        self.kind = kind
        self.id = ('chatcmpl-' if kind == CHAT_KIND else 'cmpl-') + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {'prompt_tokens': self.prompt_tokens, 'completion_tokens': completion_tokens,
                'total_tokens': self.prompt_tokens + completion_tokens}

    def _object(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {'id': self.id, 'object': kind, 'created': self.created, 'model': self.model,
                'choices': choices}
        if usage is not None:
            body['usage'] = usage
        return body

    def whole(self, text: str, finish_reason: str, completion_tokens: int) -> dict[str, Any]:
        choice = {'index': 0, 'finish_reason': finish_reason, 'logprobs': None}
        if self.kind == CHAT_KIND:
            choice['message'] = {'role': 'assistant', 'content': text}
        else:
            choice['text'] = text
        return self._object(self.kind, [choice], self.usage(completion_tokens))

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        """A stream chunk; for chat, text None is the first chunk (the role)."""
        choice = {'index': 0, 'finish_reason': finish_reason, 'logprobs': None}
        if self.kind == CHAT_KIND:
            choice['delta'] = ({'role': 'assistant', 'content': ''} if text is None
                               else {'content': text} if text else {})
            return self._object('chat.completion.chunk', [choice])
        choice['text'] = text or ''
        return self._object(self.kind, [choice])

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        kind = 'chat.completion.chunk' if self.kind == CHAT_KIND else self.kind
        return self._object(kind, [], self.usage(completion_tokens))
