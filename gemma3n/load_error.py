"""`LoadError`: `gemma3n.load` refusing its arguments, in words for Python or for a front end.

The same mistake reads `model='e2b' does not fit ...` to a Python caller and `--model e2b does
not fit ...` to a user of the command, from one message: the message names `load`'s parameters
and `describe(option_names)` spells them.

Example:
    >>> error = LoadError('{model} needs {path}', {'model': 'e4b', 'path': PATH})
    >>> str(error), error.describe({'model': '--model', 'path': '--checkpoint'})
    ("model='e4b' needs path=PATH", '--model e4b needs --checkpoint PATH')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


class _Placeholder(str):
    """A value shown as it is, unquoted (PATH in `tokenizer=PATH`)."""

    def __repr__(self) -> str:
        return str(self)


PATH = _Placeholder('PATH')


@dataclasses.dataclass(frozen=True)
class _Argument:
    """One `load` argument inside a LoadError message, spelled for its reader: Python's
    `model='e2b'`, or a front end's option (`--model e2b`); format spec 'name': the name alone."""
    name: str
    value: Any
    option: str | None

    def __format__(self, spec: str) -> str:
        if spec == 'name':
            return self.option or self.name
        if self.option is None:
            return f'{self.name}={self.value!r}'
        return self.option if self.value is True else f'{self.option} {self.value}'


class LoadError(ValueError):
    """`load` refused its arguments before reading any weights.

    The message names `load`'s parameters as Python spells them (`model='e2b'`);
    `describe(option_names)` spells them as another front end does (the command: `--model
    e2b`), as `InsufficientMemoryError.describe` does with its options.
    """

    def __init__(self, template: str, arguments: Mapping[str, Any], **fields: Any):
        """`template`: the message with {fields} and {arguments} (`{model:name}`: the name);
        `arguments`: the `load` parameters it names, with their values."""
        self.template, self.arguments, self.fields = template, dict(arguments), fields
        super().__init__(self.describe())

    def describe(self, option_names: Mapping[str, str] | None = None) -> str:
        names = option_names or {}
        spelled = {name: _Argument(name, value, names.get(name))
                   for name, value in self.arguments.items()}
        return self.template.format(**self.fields, **spelled)
