"""Nested parameter dicts and their flat form, keyed by '/'-joined paths ('layer_0/mlp/linear').

Every checkpoint format names a parameter by its path; these two helpers convert between the
nested Flax tree and that flat form.

Example:
    >>> flatten_params({'final_norm': {'scale': x}})          # {'final_norm/scale': x}
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}; leaves declared with logical axes (the towers', boxed by
    `init`) are unboxed."""
    flat = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            flat.update({f'{name}/{sub}': leaf for sub, leaf in flatten_params(value).items()})
        else:
            flat[name] = value.unbox() if isinstance(value, nn.meta.AxisMetadata) else value
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split('/')
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return tree
