"""Compiles the decode kernels (`kernels/decode_kernels.cc` and the headers it includes) once per
machine, on first use.

The shared library is built against the FFI headers of the jaxlib that is running (so the
handlers always match the XLA that calls them, whatever jaxlib a build environment would have
fetched) and kept in a cache folder keyed by the sources (every file in `kernels/`), the jaxlib
version and the compiler: later processes load it in milliseconds. The compiler is `$CXX`, else `c++`; the folder
`$GEMMA3N_KERNEL_CACHE`, else `$XDG_CACHE_HOME/gemma3n/kernels` (default `~/.cache/...`).

Example:
    >>> library = build_kernels()        # a path, or KernelBuildError saying why not
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

SOURCE_DIR = Path(__file__).parent / 'kernels'
# The one translation unit; it includes the other files of SOURCE_DIR.
SOURCE = SOURCE_DIR / 'decode_kernels.cc'
CACHE_ENV = 'GEMMA3N_KERNEL_CACHE'
# -march is deliberately absent: the source picks AVX-512 or AVX2 per function at run time, so
# one library serves every x86 CPU the cache folder may be shared with.
COMPILE_FLAGS = ('-O3', '-std=c++20', '-shared', '-fPIC')
COMPILE_TIMEOUT_S = 300


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled (no compiler, or it failed); the message says why."""


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'gemma3n' / 'kernels'


def _compiler() -> str:
    name = os.environ.get('CXX', 'c++')
    found = shutil.which(name)
    if found is None:
        raise KernelBuildError(f'no C++ compiler found (looked for {name!r}; set $CXX)')
    return found


def build_key(compiler: str) -> str:
    """The cache key of a build: every source file (named, in a fixed order, so editing a header
    rebuilds too), the jaxlib version, the compiler and its flags."""
    sources = [part for path in sorted(SOURCE_DIR.iterdir()) if path.is_file()
               for part in (path.name.encode(), path.read_bytes())]
    return hashlib.sha256(b'\0'.join([
        *sources, jaxlib.__version__.encode(), compiler.encode(),
        ' '.join(COMPILE_FLAGS).encode()])).hexdigest()[:16]


def build_kernels() -> Path:
    """The compiled library's path, compiling it first if the cache lacks it."""
    compiler = _compiler()
    target = cache_dir() / f'decode_kernels-{build_key(compiler)}.so'
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compiled under a private name and renamed into place, so processes building at the same
    # time never load a half-written library.
    fd, partial = tempfile.mkstemp(suffix='.so', dir=target.parent)
    os.close(fd)
    command = [compiler, *COMPILE_FLAGS, '-I', jax.ffi.include_dir(), str(SOURCE), '-o', partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ['(no output)'])[-1]
            raise KernelBuildError(f'{Path(compiler).name} failed: {last}')
        os.replace(partial, target)
    except subprocess.TimeoutExpired as e:
        raise KernelBuildError(f'compiling took over {COMPILE_TIMEOUT_S} s') from e
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
