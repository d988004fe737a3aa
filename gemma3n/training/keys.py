"""Model inputs by key: the model's string fields name where in a context each input lives.

`Gemma3nTransformer` declares `tokens`, `images`, `positions` and `attention_mask` as strings
(e.g. `Gemma3n_E4B(tokens='batch.input')`). As in Google's kauldron training framework, a key is a
dotted path into a context: `'batch.input'` is `context['batch']['input']`; each part indexes a
mapping by name, a sequence by number, or else reads an attribute.

Example:
    >>> model = Gemma3n_E4B(text_only=True, tokens='batch.input')
    >>> model_inputs(model, {'batch': {'input': tokens}})
    {'tokens': tokens}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gemma3n.transformer import KEY_REQUIRED

# The model's fields that name a context key, and the keyword of __call__ each one fills.
INPUT_FIELDS = ('tokens', 'images', 'positions', 'attention_mask')
PATH_SEPARATOR = '.'


def get_by_path(context: Any, path: str) -> Any:
    """The value at dotted `path` in `context`; KeyError naming the part that is missing."""
    if not path:
        raise KeyError('an empty key names no input')
    value = context
    walked = []
    for part in path.split(PATH_SEPARATOR):
        walked.append(part)
        if isinstance(value, Mapping):
            found = part in value
            value = value.get(part)
        elif isinstance(value, Sequence) and not isinstance(value, str) and part.isdigit():
            found = int(part) < len(value)
            value = value[int(part)] if found else None
        else:
            found = hasattr(value, part)
            value = getattr(value, part, None)
        if not found:
            raise KeyError(f'key {path!r}: the context has no {PATH_SEPARATOR.join(walked)!r}')
    return value


def model_inputs(model: Any, context: Any) -> dict[str, Any]:
    """The keyword inputs of `model.__call__` that its key fields name, read from `context`.

    A field left None is not an input; `tokens` must name a key (the model's default
    KEY_REQUIRED does not).
    """
    if getattr(model, 'tokens', KEY_REQUIRED) == KEY_REQUIRED:
        raise ValueError(f'{type(model).__name__} does not say where its tokens are: build it with '
                         "tokens='batch.input' (a dotted key into the training context).")
    return {field: get_by_path(context, getattr(model, field)) for field in INPUT_FIELDS
            if getattr(model, field) is not None}
