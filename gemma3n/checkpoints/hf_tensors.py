"""Our parameter tree from a tower's checkpoint tensors, each checked by name and shape first.

A tower's mapping (`hf_audio`, `hf_mobilenet`) says how the checkpoint stores each of our leaves
(`Stored`: HF name, HF shape, conversion, our dtype); `read_params` checks a state dict against
that, names every missing, unexpected and misshapen tensor in one error before converting
anything, and builds the nested tree.

Example:
    >>> stored = {'embedding': Stored('embedding.weight', (128, 2048), np.float32)}
    >>> params = read_params(state, stored, prefix='model.embed_vision.', what='vision embedder')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from gemma3n.checkpoints.flat_params import unflatten_params
from gemma3n.checkpoints.hf_mapping import _abbreviate


def _same(array: np.ndarray) -> np.ndarray:
    return array


class Stored(NamedTuple):
    """How the checkpoint stores one of our leaves: its name (without the prefix) and shape, the
    dtype our leaf gets, and the conversion of the checkpoint's array to our layout."""
    name: str
    shape: tuple[int, ...]
    dtype: Any
    to_ours: Callable[[np.ndarray], np.ndarray] = _same


def read_params(state: Mapping[str, Any], stored: Mapping[str, Stored], *, prefix: str,
                what: str) -> dict[str, Any]:
    """Our nested params ({'/'-joined path: Stored} -> tree) from `state` (HF name -> array;
    names outside `prefix` are ignored).

    Raises ValueError naming `what` and every missing, unexpected (under `prefix`) and wrongly
    shaped tensor.
    """
    expected = {prefix + leaf.name: path for path, leaf in stored.items()}
    present = {name for name in state if name.startswith(prefix)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    wrong = [f"{name} {np.shape(state[name])} (expected {stored[expected[name]].shape})"
             for name in sorted(set(expected) & present)
             if tuple(np.shape(state[name])) != tuple(stored[expected[name]].shape)]
    problems = [f"{kind} {len(names)}: {_abbreviate(names)}" for kind, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
    if problems:
        raise ValueError(f"{what} tensors under {prefix!r} do not match the model; "
                         + "; ".join(problems))
    flat = {path: np.ascontiguousarray(leaf.to_ours(np.asarray(state[prefix + leaf.name])),
                                       dtype=leaf.dtype)
            for path, leaf in stored.items()}
    return unflatten_params(flat)
