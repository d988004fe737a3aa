"""The OpenAI wire format: requests checked field by field, errors and responses as OpenAI writes them.

A request body is a JSON object; every field is checked for its type and range before any work,
and a field this server does not know is refused (as OpenAI refuses one), so a typo is not
silently ignored. Errors are `{"error": {"message", "type", "param", "code"}}` with the status
OpenAI uses: 400 for a bad request, 404 for an unknown route, 429 when the queue is full, 503
while shutting down.

Example:
    >>> request = parse_chat({'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 8})
    >>> request.turns, request.max_tokens
    ([('user', 'Hi')], 8)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gemma3n import validation
from gemma3n.text.chat_format import MODEL_ROLE, USER_ROLE

INVALID_REQUEST = 'invalid_request_error'
CONTEXT_LENGTH_EXCEEDED = 'context_length_exceeded'
MAX_STOP_STRINGS = 4                 # as OpenAI
# OpenAI's roles and ours: Gemma has no system turn; its text opens the first user turn.
SYSTEM_ROLES = ('system', 'developer')
ROLE_NAMES = {'user': USER_ROLE, 'assistant': MODEL_ROLE}
TEXT_PART, IMAGE_PART = 'text', 'image_url'
# Fields accepted and ignored: they change nothing in what a single-choice text answer holds.
IGNORED_FIELDS = ('model', 'user', 'logprobs', 'presence_penalty', 'frequency_penalty',
                  'parallel_tool_calls', 'store', 'metadata', 'service_tier')
SAMPLING_FIELDS = ('max_tokens', 'max_completion_tokens', 'temperature', 'top_p', 'top_k', 'seed',
                   'stop', 'n', 'stream', 'stream_options')


class APIError(Exception):
    """An error the client caused (or a refusal), sent as OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = INVALID_REQUEST):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                       code, kind)

    def body(self) -> dict[str, Any]:
        return {'error': {'message': self.message, 'type': self.kind, 'param': self.param,
                          'code': self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass
class Request:
    """A checked request.

    turns: chat turns (role, text) in Gemma's roles, or None for a completion's `prompt`.
    images: per user turn, the `data:` URLs of its images, in order.
    max_tokens: None when the client left it to the server.
    temperature 0 means greedy; top_k 0 means no limit; seed None: the server picks one.
    """
    turns: list[tuple[str, str]] | None = None
    prompt: str | None = None
    images: list[str] = dataclasses.field(default_factory=list)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _expect(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    # JSON true/false are Python bools, which are ints: never a number here.
    if value is None or isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad_request(f'{name} must be {what}, got {_json_type(value)}.', name)
    return value


def _json_type(value: Any) -> str:
    names = {bool: 'a boolean', int: 'an integer', float: 'a number', str: 'a string',
             list: 'an array', dict: 'an object', type(None): 'null'}
    return names.get(type(value), type(value).__name__)


def _number(body: dict, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    value = float(_expect(body, name, (int, float), 'a number'))
    if not math.isfinite(value) or value < low or value > high or low_open and value == low:
        bracket = '(' if low_open else '['
        raise bad_request(f'{name} must be in {bracket}{low}, {high}], got {body[name]}.', name)
    return value


def _integer(body: dict, name: str, low: int, high: int) -> int:
    value = _expect(body, name, (int,), 'an integer')
    if not low <= value <= high:
        raise bad_request(f'{name} must be in [{low}, {high}], got {value}.', name)
    return value


def _check_fields(body: Any, allowed: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise bad_request(f'the request body must be a JSON object, got {_json_type(body)}.')
    unknown = sorted(set(body) - set(allowed) - set(IGNORED_FIELDS))
    if unknown:
        raise bad_request(f'Unrecognized request argument supplied: {unknown[0]}', unknown[0])
    return body


def _sampling(body: dict, request: Request) -> Request:
    present = {name for name, value in body.items() if value is not None}
    if 'n' in present and _integer(body, 'n', 1, 1) != 1:
        raise bad_request('n must be 1.', 'n')
    for name in ('max_tokens', 'max_completion_tokens'):
        if name in present:
            request.max_tokens = _integer(body, name, 1, validation.INT32_MAX)
    if 'temperature' in present:
        request.temperature = _number(body, 'temperature', 0.0, 2.0)
    if 'top_p' in present:
        request.top_p = _number(body, 'top_p', 0.0, 1.0, low_open=True)
    if 'top_k' in present:
        request.top_k = _integer(body, 'top_k', 0, validation.INT32_MAX)
    if 'seed' in present:
        request.seed = _integer(body, 'seed', 0, validation.MAX_SEED_32)
    if 'stop' in present:
        stop = body['stop']
        stop = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                or len(stop) > MAX_STOP_STRINGS):
            raise bad_request(f'stop must be a non-empty string or a list of up to '
                              f'{MAX_STOP_STRINGS} of them.', 'stop')
        request.stop = stop
    if 'stream' in present:
        request.stream = _expect(body, 'stream', (bool,), 'a boolean')
    if 'stream_options' in present:
        options = _expect(body, 'stream_options', (dict,), 'an object')
        if set(options) - {'include_usage'}:
            raise bad_request('stream_options takes include_usage only.', 'stream_options')
        if 'include_usage' in options:
            request.include_usage = _expect(options, 'include_usage', (bool,), 'a boolean')
    return request


def parse_chat(body: Any) -> Request:
    """A chat-completions body: `messages` and the sampling fields."""
    body = _check_fields(body, ('messages',) + SAMPLING_FIELDS)
    messages = _expect(body, 'messages', (list,), 'an array of messages')
    if not messages:
        raise bad_request('messages must hold at least one message.', 'messages')
    request = Request(turns=[])
    system = []
    for index, message in enumerate(messages):
        param = f'messages[{index}]'
        if not isinstance(message, dict):
            raise bad_request(f'{param} must be an object, got {_json_type(message)}.', param)
        role = message.get('role')
        if role not in SYSTEM_ROLES and role not in ROLE_NAMES:
            raise bad_request(f'{param}.role must be one of '
                              f'{list(SYSTEM_ROLES) + list(ROLE_NAMES)}, got {role!r}.', param)
        text, images = _content(message.get('content'), f'{param}.content',
                                images_allowed=role == 'user')
        if role in SYSTEM_ROLES:
            system.append(text)
            continue
        role = ROLE_NAMES[role]
        if role == USER_ROLE and system:
            text, system = '\n\n'.join(system + [text]), []
        if request.turns and request.turns[-1][0] == role:
            # Consecutive messages of one role are one turn (Gemma's turns alternate).
            request.turns[-1] = (role, request.turns[-1][1] + '\n\n' + text)
        else:
            request.turns.append((role, text))
        request.images += images
    if not request.turns or request.turns[0][0] != USER_ROLE or request.turns[-1][0] != USER_ROLE:
        raise bad_request('messages must start and end with a user message (after any system '
                          'messages).', 'messages')
    return _sampling(body, request)


def _content(content: Any, param: str, *, images_allowed: bool) -> tuple[str, list[str]]:
    """A message's text and image URLs: a string, or a list of text and image_url parts."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_request(f'{param} must be a string or an array of parts, got '
                          f'{_json_type(content)}.', param)
    texts, images = [], []
    for index, part in enumerate(content):
        where = f'{param}[{index}]'
        kind = part.get('type') if isinstance(part, dict) else None
        if kind == TEXT_PART and isinstance(part.get('text'), str):
            texts.append(part['text'])
        elif kind == IMAGE_PART and images_allowed:
            url = part.get(IMAGE_PART)
            url = url.get('url') if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad_request(f'{where}.image_url.url must be a string.', where)
            images.append(url)
            texts.append('<start_of_image>')
        else:
            raise bad_request(f'{where} must be a text part {{"type": "text", "text": ...}}'
                              + (' or an image_url part' if images_allowed else ''), where)
    return ''.join(texts), images


def parse_completion(body: Any) -> Request:
    """A (legacy) completions body: one `prompt` string and the sampling fields."""
    body = _check_fields(body, ('prompt', 'echo', 'suffix', 'best_of') + SAMPLING_FIELDS)
    for name in ('echo', 'suffix', 'best_of'):
        if body.get(name) not in (None, False, 1):
            raise bad_request(f'{name} is not supported.', name)
    prompt = _expect(body, 'prompt', (str, list), 'a string')
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request('prompt must be one string (batches of prompts are not supported).',
                              'prompt')
        prompt = prompt[0]
    return _sampling(body, Request(prompt=prompt))
