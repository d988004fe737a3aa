"""Giving the C heap's freed pages back to the system once a program is compiled.

Compiling (or reading back) an E4B program allocates a few hundred MB on XLA's threads and frees
it again, but glibc keeps freed memory inside its per-thread arenas, resident: after the first
prefill of a bf16 E4B the process held 0.45 GB more anonymous memory, in four 64 MB-aligned
arenas and the main heap, though XLA's own buffers for that program were 73 MB. `malloc_trim`
hands the free pages of every arena back (measured there: 0.26 GB of the 0.45).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith('linux'):
        return None
    trim = getattr(ctypes.CDLL(None), 'malloc_trim', None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_freed_memory() -> None:
    """Returns the pages the C heap holds free to the system (a no-op without glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
