"""Training data: JSONL files of conversations or plain texts, tokenised with a loss mask.

Each line is one JSON object, either a conversation in the HF/OpenAI chat convention

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

or a plain text `{"text": "..."}`. A conversation is tokenised the way `ChatSampler` feeds it
(gemma3n/text/chat_format.py): `[BOS] + encode(format_user_turn(user_1))`, then the answer's ids
and `<end_of_turn>`, then `encode(format_continuation(user_2))`, and so on; `assistant` is our
`model` role. Gemma has no system role: a system message is put before the first user message,
separated by a blank line (as Gemma's chat template does). A text is `[BOS] + encode(text) + [EOS]`.

The loss mask marks the tokens the loss counts as targets: by default the answers and their
`<end_of_turn>` (what the model itself writes in a chat) and every token of a plain text;
with `LossOn.ALL`, every token after BOS.

Example:
    >>> examples = read_jsonl('train.jsonl', tokenizer, LossOn.MODEL_TURNS)
    >>> examples[0].tokens, examples[0].loss_mask     # int32 [n], bool [n]
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gemma3n.text import special_tokens
from gemma3n.text.chat_format import MODEL_ROLE, USER_ROLE, format_continuation, format_user_turn
from gemma3n.text.tokenizer import Tokenizer

ROLE_NAMES = {'user': USER_ROLE, 'assistant': MODEL_ROLE}
SYSTEM_ROLE = 'system'
SYSTEM_SEPARATOR = '\n\n'      # between a system message and the first user message
MESSAGES_KEY, TEXT_KEY = 'messages', 'text'


class LossOn(enum.Enum):
    """Which tokens the loss counts."""
    MODEL_TURNS = 'model-turns'     # the answers (plain texts: all their tokens)
    ALL = 'all'                     # every token after BOS


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised example: tokens int32 [n], loss_mask bool [n] (True: a target of the loss)."""
    tokens: np.ndarray
    loss_mask: np.ndarray


class DataError(ValueError):
    """A training file that cannot be used, naming the file and the line."""


def read_jsonl(path: str | os.PathLike, tokenizer: Tokenizer, loss_on: LossOn) -> list[Example]:
    """Every example of the JSONL file at `path`; DataError naming the first bad line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f'data file not found: {path}')
    examples = []
    with open(path, encoding='utf-8') as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                examples.append(tokenize_record(record, tokenizer, loss_on))
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as error:
                raise DataError(f'{path}, line {number}: {error}') from None
    if not examples:
        raise DataError(f'{path} holds no examples (an empty file, or only blank lines).')
    return examples


def tokenize_record(record: Any, tokenizer: Tokenizer, loss_on: LossOn) -> Example:
    """One JSON record -> Example; ValueError saying what is wrong with it."""
    if not isinstance(record, dict) or (MESSAGES_KEY in record) == (TEXT_KEY in record):
        raise ValueError(f'expected an object with either "{MESSAGES_KEY}" or "{TEXT_KEY}"')
    if TEXT_KEY in record:
        text = record[TEXT_KEY]
        if not isinstance(text, str) or not text:
            raise ValueError(f'"{TEXT_KEY}" must be a non-empty string')
        tokens = [special_tokens.BOS] + tokenizer.encode(text) + [special_tokens.EOS]
        return _example([(tokens, True)], loss_on)
    turns = _turns(record[MESSAGES_KEY])
    pieces: list[tuple[list[int], bool]] = []
    for index, (role, text) in enumerate(turns):
        if role == USER_ROLE:
            prompt = format_user_turn(text) if index == 0 else format_continuation(text)
            pieces.append((tokenizer.encode(prompt, add_bos=index == 0), False))
        else:
            pieces.append((tokenizer.encode(text) + [special_tokens.END_OF_TURN], True))
    if not any(counted for _, counted in pieces) and loss_on == LossOn.MODEL_TURNS:
        raise ValueError('the conversation has no assistant message to learn from')
    return _example(pieces, loss_on)


def _turns(messages: Any) -> list[tuple[str, str]]:
    """The chat messages as alternating (role, text) turns, the system message folded in."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"{MESSAGES_KEY}" must be a non-empty list')
    for index, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get('content'), str)
                or message.get('role') not in (*ROLE_NAMES, SYSTEM_ROLE)):
            raise ValueError(f'message {index} must be {{"role": "user"|"assistant"|"system", '
                             f'"content": "..."}}, got {json.dumps(message)[:80]}')
    system = None
    if messages[0]['role'] == SYSTEM_ROLE:
        system, messages = messages[0]['content'], messages[1:]
    turns = [(ROLE_NAMES.get(m['role'], m['role']), m['content']) for m in messages]
    for index, (role, _) in enumerate(turns):
        expected = (USER_ROLE, MODEL_ROLE)[index % 2]
        if role != expected:
            shown = 'assistant' if expected == MODEL_ROLE else expected
            raise ValueError(f'message {index + (system is not None)} has role '
                             f'{"system" if role == SYSTEM_ROLE else role!r} where {shown!r} was '
                             'expected: after an optional system message, user and assistant '
                             'messages alternate, starting with user')
    if system is not None:
        if not turns:
            raise ValueError('a system message needs a user message after it')
        turns[0] = (USER_ROLE, system + SYSTEM_SEPARATOR + turns[0][1])
    return turns


def _example(pieces: list[tuple[list[int], bool]], loss_on: LossOn) -> Example:
    tokens = np.concatenate([np.asarray(ids, np.int32) for ids, _ in pieces])
    if loss_on == LossOn.ALL:
        mask = np.ones(len(tokens), bool)
    else:
        mask = np.concatenate([np.full(len(ids), counted) for ids, counted in pieces])
    mask[0] = False      # the first token is nobody's target
    return Example(tokens=tokens, loss_mask=mask)
