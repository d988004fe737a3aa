"""Checks of what callers and files hand to the library, made before a value is narrowed or used.

Integers are checked in the width they came in (a Python int or an integer array of any dtype)
before they become int32, so a value beyond int32 or int64 is an error rather than a silent wrap.
Weights read from a file are checked for NaN/Inf, which no checkpoint format guards against.

Example:
    >>> check_int('max_new_tokens', 8, low=1)                   # 8
    >>> rows = prompt_rows([2, 17, 42], vocab_size=300)         # one sequence: [array([2, 17, 42])]
    >>> key = as_rng(7)                                         # a JAX key
    >>> check_finite('layer_0/mlp/linear', weights)             # ValueError naming it on NaN/Inf
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

INT32_MAX = int(np.iinfo(np.int32).max)
# JAX keys take a seed's low 32 bits (64 with jax_enable_x64): a larger seed would silently
# repeat a smaller one.
MAX_SEED_32, MAX_SEED_64 = 2 ** 32 - 1, 2 ** 63 - 1
RAW_KEY_SHAPE = (2,)               # a legacy `jax.random.PRNGKey`: two uint32 words
# Values checked for NaN/Inf per pass: small enough that the temporary stays in the CPU cache.
FINITE_CHUNK = 1 << 20
SHOWN_IDS = 8                      # how many bad ids an error message lists


def is_integer(value: Any) -> bool:
    """Whether `value` is one integer (a bool is not: True as a count or an id is a mistake)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, *, low: int, high: int = INT32_MAX) -> int:
    """`value` as an int; TypeError unless it is an integer, ValueError outside [low, high]."""
    if not is_integer(value):
        raise TypeError(f'{name} must be an integer, got {type(value).__name__} {value!r}.')
    if not low <= value <= high:
        raise ValueError(f'{name} must be in [{low}, {high}], got {value}.')
    return int(value)


def check_real(name: str, value: Any) -> float:
    """`value` as a float; TypeError unless it is a real number (not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a number, got {type(value).__name__} {value!r}.')
    return float(value)


def max_seed() -> int:
    """The largest seed whose JAX key differs from every smaller seed's."""
    return MAX_SEED_64 if jax.config.jax_enable_x64 else MAX_SEED_32


def as_rng(rng: Any, name: str = 'rng') -> jax.Array:
    """A JAX key from `rng`: an int seed in [0, max_seed()], a key (`jax.random.key`) or a raw
    `jax.random.PRNGKey`; None is seed 0. TypeError (one line, naming `name`) for anything else."""
    if rng is None:
        return jax.random.key(0)
    if is_integer(rng):
        return jax.random.key(check_int(f'{name} (a seed)', rng, low=0, high=max_seed()))
    dtype = getattr(rng, 'dtype', None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and rng.shape == ():
        return rng
    if dtype == np.uint32 and tuple(rng.shape) == RAW_KEY_SHAPE:
        return rng
    shape = f' of shape {tuple(rng.shape)} and dtype {dtype}' if dtype is not None else ''
    raise TypeError(f'{name} must be an int seed or a JAX key (jax.random.key(seed)), got '
                    f'{type(rng).__name__}{shape}.')


def token_ids(name: str, ids: Any, vocab_size: int, extra_ids: Sequence[int] = ()) -> np.ndarray:
    """`ids` (integers, or an integer array of any shape) as int32, each in [0, vocab_size) or
    one of `extra_ids`; TypeError/ValueError naming `name`, the id and its index otherwise."""
    if is_integer(ids):
        raise TypeError(f'{name} must be a sequence of token ids, got the single id {ids}: '
                        f'write ({ids},).')
    if isinstance(ids, (np.ndarray, jax.Array)):
        array = np.asarray(ids)
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f'{name} must hold integer token ids, got dtype {array.dtype}.')
    else:
        # dtype=object keeps Python ints of any size exact until they are known to fit int64.
        array = np.array(ids, dtype=object)
        if not all(type(v) is int for v in array.flat):      # the common case, checked fast
            wrong = next((v for v in array.flat if not is_integer(v)), None)
            if wrong is not None:
                raise TypeError(f'{name} must hold integer token ids, got '
                                f'{type(wrong).__name__} {wrong!r}.')
        try:
            array = array.astype(np.int64)
        except OverflowError:
            pass                          # compared as Python ints below
    bad = ((array < 0) | (array >= vocab_size)) & ~np.isin(array, list(extra_ids))
    if bad.any():
        where = np.argwhere(bad)
        index = tuple(int(i) for i in where[0]) if array.ndim > 1 else int(where[0][0])
        shown = sorted({int(v) for v in array[bad].flat})[:SHOWN_IDS]
        raise ValueError(f'{name} has token id {int(array[bad].flat[0])} (at index {index}) '
                         f'outside the vocabulary [0, {vocab_size}); bad ids: {shown}.')
    return array.astype(np.int32)


def prompt_rows(prompt_tokens: Any, vocab_size: int, extra_ids: Sequence[int] = ()
                ) -> list[np.ndarray]:
    """The sequences of `prompt_tokens` as int32 rows, every id checked by `token_ids`.

    Takes a list of token-id lists (ragged), an integer array [B, L], or one sequence: a list
    of ints or an array [L].
    """
    if isinstance(prompt_tokens, (np.ndarray, jax.Array)):
        array = np.asarray(prompt_tokens)
        if array.ndim not in (1, 2):
            raise ValueError(f'prompt_tokens must be [B, L] or one sequence [L], got shape '
                             f'{array.shape}.')
        rows = [array] if array.ndim == 1 else list(array)
    elif isinstance(prompt_tokens, (str, bytes)):
        raise TypeError('prompt_tokens must hold token ids, got text: encode it with the '
                        'tokenizer (or use sample() for text).')
    else:
        items = list(prompt_tokens)
        if items and all(is_integer(item) for item in items):
            rows = [items]
        elif all(isinstance(item, (Sequence, np.ndarray, jax.Array))
                 and not isinstance(item, (str, bytes)) for item in items):
            rows = items
        else:
            raise TypeError('prompt_tokens must be a list of token-id lists, an array [B, L], '
                            'or one list of token ids; got a list mixing '
                            f'{sorted({type(item).__name__ for item in items})}.')
    if not rows:
        raise ValueError('prompt_tokens holds no sequence.')
    checked = []
    for b, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError(f'prompt {b} is empty: give at least one token (usually BOS).')
        checked.append(token_ids(f'prompt {b}', row, vocab_size, extra_ids))
    return checked


def check_finite(what: str, x: Any) -> None:
    """ValueError naming `what` when the float array `x` holds NaN or Inf.

    Reads `x` once in memory order, a cache-sized chunk at a time, comparing the bits of each
    value's magnitude with those of Inf (IEEE floats: NaN and Inf are the largest): about 17 GB/s
    on one core, so a loader can afford it for every weight. Non-float arrays pass.
    """
    x = np.asarray(x)
    if x.dtype.kind != 'f' and x.dtype.name != 'bfloat16':
        return
    bits = np.dtype(f'u{x.dtype.itemsize}')
    inf_bits = np.array(np.inf, x.dtype).view(bits)
    magnitude = bits.type((1 << (8 * x.dtype.itemsize - 1)) - 1)    # every bit but the sign
    scratch = np.empty(FINITE_CHUNK, bits)
    chunks = np.nditer(x.view(bits), flags=['external_loop', 'buffered', 'zerosize_ok'],
                       order='K', buffersize=FINITE_CHUNK)
    for chunk in chunks:
        part = scratch[:chunk.size]
        np.bitwise_and(chunk, magnitude, out=part)
        if part.max() >= inf_bits:
            bad = ~np.isfinite(x.astype(np.float32) if x.dtype.itemsize < 4 else x)
            raise ValueError(
                f'{what} holds {int(bad.sum())} non-finite value(s) (NaN/Inf) of {x.size} as '
                f'{x.dtype}, the first at index {tuple(int(i) for i in np.argwhere(bad)[0])}: '
                f'the checkpoint is damaged, or its values do not fit {x.dtype}.')


def check_all_finite(arrays: Mapping[str, Any]) -> None:
    """`check_finite(what, array)` for each item of `arrays`, on every core at once: numpy's
    loops release the GIL, and the 9 GB of a bfloat16 E4B were checked in 0.65 s on two cores
    against 1.25 s on one. The error names the first bad array in `arrays`' order."""
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    try:
        for _ in pool.map(lambda item: check_finite(*item), arrays.items()):
            pass
    finally:
        pool.shutdown(cancel_futures=True)
