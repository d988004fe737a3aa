"""Traced programs on disk (`jax.export`): a warm run skips tracing the model in Python.

JAX's persistent compilation cache (`gemma3n.compilation`) keeps compiled programs, but it finds
one by the program's text: every run still traced the model in Python (flax) and lowered it
before the cache could answer. At E4B widths with 10 layers that was 2.4 s of a 4.6 s first
token with a warm cache (tracing 1.8 s, lowering 0.7 s), and it grows with the layers.

`ExportedJit(fn, ...)` is called like `jax.jit(fn)`. Once `keep_exported_programs(folder)` has
been called (`use_compilation_cache` does), the first call with a new signature exports `fn`
(traces and lowers it, as jit would), writes the serialised program into the folder, and runs
it; a later process with the same signature reads it back and runs it without tracing. The
compiled program then comes from JAX's cache as before.

A stored program's key holds everything the traced program depends on, so that a change makes
a new program instead of reusing a stale one: the function's name; the caller's `context` (the
engine passes the model's repr: its configuration and dtype, and the tokens it forbids); the
arguments' tree structure (static pytrees such as a sampling method print their settings in it),
shapes, dtypes and weak types; the JAX and jaxlib versions, the backend, the decode kernels'
instruction set (`$GEMMA3N_KERNELS`, or None when they are off or not built), the relevant JAX
flags, and a digest of this package's source, Python and C++.

Arguments placed on a mesh are not exported (the programs would carry its shardings): those
calls, and every call before `keep_exported_programs`, go to `jax.jit(fn)` itself. A damaged or
unreadable file is deleted and exported again, with a warning; a folder that cannot be written
leaves the programs in memory, with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

from gemma3n.compiler_options import compiler_options
from gemma3n.freed_memory import return_freed_memory
from gemma3n.layers import decode_kernels

# Inside JAX's cache folder: JAX's own entries are files '<key>-cache' at its top level only.
EXPORTED_SUBFOLDER = 'gemma3n-exported'
FILE_SUFFIX = '.exported'
SOURCE_SUFFIXES = ('.py', '.cc', '.h')
PACKAGE_ROOT = Path(__file__).resolve().parent

logger = logging.getLogger(__name__)

_folder: Path | None = None
_unwritable: set[Path] = set()     # folders already reported


def keep_exported_programs(folder: Path | None) -> None:
    """Keeps the engine's traced programs in `folder` from now on (None: no longer)."""
    global _folder
    _folder = folder


@functools.cache
def source_digest() -> str:
    """sha256 over this package's source files (their paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in PACKAGE_ROOT.rglob('*') if p.suffix in SOURCE_SUFFIXES):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _environment() -> tuple:
    """What, besides the arguments, decides the traced program. `active_isa` also registers the
    kernels with XLA, which a program read from disk needs before it compiles."""
    return (jax.__version__, jaxlib.__version__, jax.default_backend(),
            decode_kernels.active_isa(), jax.config.jax_enable_x64,
            str(jax.config.jax_default_matmul_precision), source_digest())


def _signature(leaf: Any) -> tuple:
    """A leaf's part of the key: its type (shape, dtype, weak type), and whether it sits on a
    mesh of several devices."""
    sharding = getattr(leaf, 'sharding', None)
    spread = sharding is not None and len(sharding.device_set) > 1
    return jax.typeof(leaf), spread


class ExportedJit:
    """`jax.jit(fn, donate_argnames=...)` whose programs are kept on disk (module docstring).

    Args:
        fn: the function; its arguments are pytrees of arrays (and static pytrees).
        name: names its files, and is part of their key.
        context: what else `fn`'s program depends on, as a string (part of the key).
        donate_argnames: as `jax.jit`'s.

    `programs` counts the signatures this object has been called with: each one was traced,
    or read from disk.
    """

    def __init__(self, fn: Callable, *, name: str, context: str,
                 donate_argnames: Sequence[str] = ()):
        self._fn = fn
        self._name = name
        self._context = context
        self._options = compiler_options()
        self._jit = jax.jit(fn, donate_argnames=tuple(donate_argnames),
                            compiler_options=self._options)
        parameters = list(inspect.signature(fn).parameters)
        self._donated = frozenset(parameters.index(name) for name in donate_argnames)
        self._callers: dict[tuple, Callable] = {}
        self._last: tuple[list, tuple] = ([], ())     # the previous call's leaves and signatures

    @property
    def programs(self) -> int:
        return len(self._callers)

    def lower(self, *args: Any) -> Any:
        """`jax.jit(fn).lower(*args)`: the traced program, to inspect."""
        return self._jit.lower(*args)

    def __call__(self, *args: Any) -> Any:
        leaves, tree = jax.tree.flatten(args)
        signature = (tree, self._leaf_signatures(leaves))
        caller = self._callers.get(signature)
        if caller is not None:
            return caller(*leaves)
        caller = self._callers[signature] = self._new_caller(args, tree, signature)
        result = caller(*leaves)            # compiled (or read back) here, then dispatched
        return_freed_memory()               # what compiling freed, resident otherwise
        return result

    def _leaf_signatures(self, leaves: list) -> tuple:
        """Each leaf's `_signature`, reused for a JAX array that is the very object the previous
        call had in its place: a decode step passes the same weights every time, and computing
        their signatures took ~5 ms of a ~115 ms E4B int4 step (1,078 leaves). A JAX array
        cannot change its type or placement (a NumPy array can be reshaped in place: always
        looked at); the previous leaves are held, so no new object takes one of their ids."""
        last_leaves, last = self._last
        if len(last_leaves) == len(leaves):
            signatures = tuple(
                old if leaf is previous and not isinstance(leaf, np.ndarray) else _signature(leaf)
                for leaf, previous, old in zip(leaves, last_leaves, last))
        else:
            signatures = tuple(_signature(leaf) for leaf in leaves)
        self._last = (leaves, signatures)
        return signatures

    def _new_caller(self, args: tuple, tree: Any, signature: tuple) -> Callable:
        """The jitted function of one signature, taking the arguments' leaves. Flat, as the
        stored programs are: jit's own flattening of the weights' pytree nodes (Python
        callbacks), after this call's, cost ~5 ms a decode step at E4B's 1,078 leaves."""
        owners = [i for i, arg in enumerate(args) for _ in jax.tree.leaves(arg)]
        donate = tuple(i for i, owner in enumerate(owners) if owner in self._donated)
        folder = _folder
        if folder is None or any(spread for _, spread in signature[1]):
            return jax.jit(self._flat(tree), donate_argnums=donate, compiler_options=self._options)
        key = hashlib.sha256(repr((self._name, self._context, str(tree),
                                   [str(aval) for aval, _ in signature[1]],
                                   _environment())).encode()).hexdigest()
        path = folder / f'{self._name}-{key[:40]}{FILE_SUFFIX}'
        exported = _read(path)
        if exported is None:
            exported = self._export([aval for aval, _ in signature[1]], tree)
            _write(path, exported)
        return jax.jit(exported.call, donate_argnums=donate, compiler_options=self._options)

    def _flat(self, tree: Any) -> Callable:
        """`fn` taking the leaves of arguments of structure `tree` (its own tree out)."""
        return lambda *leaves: self._fn(*jax.tree.unflatten(tree, leaves))

    def _export(self, avals: list, tree: Any) -> jax.export.Exported:
        """`fn` traced and lowered for leaves of these types (flat in, its own tree out)."""
        checks = [jax.export.DisabledSafetyCheck.custom_call(target)
                  for target in decode_kernels.TARGETS.values()]
        shapes = [jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)
                  for aval in avals]
        return jax.export.export(jax.jit(self._flat(tree)), disabled_checks=checks)(*shapes)


def _read(path: Path) -> jax.export.Exported | None:
    """The program stored at `path`; None when there is none, or it cannot be read (then it is
    deleted, to be written again)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None     # not written yet (or the folder cannot exist: `_write` says so)
    except OSError as error:
        logger.warning('cannot read the traced program %s (%s): tracing it again', path, error)
        return None
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as error:  # noqa: BLE001  (a damaged flatbuffer raises various types)
        logger.warning('deleted the damaged traced program %s (%s); it is traced and written '
                       'again', path, error)
        path.unlink(missing_ok=True)
        return None


def _write(path: Path, exported: jax.export.Exported) -> None:
    """Stores `exported` at `path`, whole or not at all (a killed run leaves no partial file)."""
    partial = path.with_name(f'{path.name}.{os.getpid()}.partial')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(exported.serialize())
        os.replace(partial, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        if path.parent not in _unwritable:
            _unwritable.add(path.parent)
            logger.warning('cannot keep traced programs in %s (%s): the next run traces them '
                           'again', path.parent, error)
