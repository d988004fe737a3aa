"""Compiled programs on disk: JAX's persistent compilation cache, kept healthy and announced.

`use_compilation_cache(folder)` turns the cache on and watches JAX's compiler:
- An entry JAX cannot read (a file cut short by a killed run, or damaged on disk) makes JAX warn
  and compile again on every run, since it never overwrites an existing entry. The watcher
  deletes such an entry as soon as JAX reports the miss, so the program compiled then takes its
  place, and reports it once in a line of its own instead of JAX's warning.
- Every program is kept on disk, however quickly it compiled (JAX keeps only those over 1 s by
  default), so a warm run compiles nothing.
- The engine's traced programs are kept beside them (`gemma3n.exported_programs`), so that a
  warm run does not trace the model in Python either.
- Inside `compile_notice(...)`, a compile that runs longer than NOTICE_AFTER_S is announced
  once: such a wait happens on the first run only.

Both hang on what JAX 0.10 logs (at DEBUG, unseen by default) right before it compiles a program
the cache lacks: "PERSISTENT COMPILATION CACHE MISS for <name> with key <key>".

Example:
    >>> use_compilation_cache(Path.home() / '.cache' / 'gemma3n' / 'jax')
    >>> with compile_notice(print, 'compiling (first run only)...'):
    ...     out = step(params, tokens)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

from gemma3n.exported_programs import EXPORTED_SUBFOLDER, keep_exported_programs

JAX_COMPILER_LOGGER = 'jax._src.compiler'
CACHE_MISS_MESSAGE = 'PERSISTENT COMPILATION CACHE MISS'
# JAX's files of an entry: '<key>-cache', and '<key>-atime' when it evicts old entries.
ENTRY_FILE_SUFFIXES = ('-cache', '-atime')
READ_ERROR_WARNING = 'Error reading persistent compilation cache entry'
COMPILE_END_EVENT = '/jax/core/compile/backend_compile_duration'   # after a compile or cache hit
# JAX keeps only programs that compiled for longer than this (default 1 s). Measured at E4B
# widths (bench.load_speed): with it, a run whose prefill and step came from the cache still
# compiled 6-13 small programs again (int8/int4 conversion's among them, on every load). Kept
# all, unless the environment chose.
MIN_COMPILE_TIME_ENV = 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'
KEEP_EVERY_PROGRAM = 0.0
# A compile longer than this is announced (`compile_notice`): shorter ones pass unnoticed.
NOTICE_AFTER_S = 1.0

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Notice:
    write: Callable[[str], None]
    message: str
    shown: bool = False


class _CompilerWatch(logging.Filter):
    """Sees JAX's cache misses; passes on only the records JAX would have shown anyway."""

    def __init__(self, shown_level: int):
        super().__init__()
        self.shown_level = shown_level
        self.notice: _Notice | None = None
        self.timer: threading.Timer | None = None
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if (isinstance(record.msg, str) and record.msg.startswith(CACHE_MISS_MESSAGE)
                and isinstance(record.args, tuple) and len(record.args) == 2):
            module_name, key = record.args
            _delete_unreadable_entry(module_name, key)
            self._compiling()
        return record.levelno >= self.shown_level

    def _compiling(self) -> None:
        with self.lock:
            if self.notice is None or self.notice.shown:
                return
            self.timer = threading.Timer(NOTICE_AFTER_S, self._announce, (self.notice,))
            self.timer.daemon = True
            self.timer.start()

    def _announce(self, notice: _Notice) -> None:
        with self.lock:
            if notice is not self.notice or notice.shown:
                return
            notice.shown = True
        notice.write(notice.message)

    def compiled(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_END_EVENT:
            with self.lock:
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None


_watch: _CompilerWatch | None = None


def use_compilation_cache(folder: Path) -> None:
    """Keeps compiled programs in `folder`, unless JAX_COMPILATION_CACHE_DIR chose one already."""
    global _watch
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update('jax_compilation_cache_dir', str(folder))
    if MIN_COMPILE_TIME_ENV not in os.environ:
        jax.config.update('jax_persistent_cache_min_compile_time_secs', KEEP_EVERY_PROGRAM)
    try:
        Path(jax.config.jax_compilation_cache_dir).mkdir(parents=True, exist_ok=True)
        if not os.access(jax.config.jax_compilation_cache_dir, os.W_OK | os.X_OK):
            raise PermissionError('no permission to write there')
    except OSError as error:
        # JAX would go on silently without a cache, compiling everything on every run.
        logger.warning('cannot keep compiled programs in %s (%s): every run compiles them '
                       'again; set JAX_COMPILATION_CACHE_DIR to a folder that can be written',
                       jax.config.jax_compilation_cache_dir, error)
        jax.config.update('jax_compilation_cache_dir', None)
        return
    keep_exported_programs(Path(jax.config.jax_compilation_cache_dir) / EXPORTED_SUBFOLDER)
    if _watch is not None:
        return      # installed by an earlier call in this process
    compiler_logger = logging.getLogger(JAX_COMPILER_LOGGER)
    _watch = _CompilerWatch(compiler_logger.getEffectiveLevel())
    compiler_logger.addFilter(_watch)
    compiler_logger.setLevel(logging.DEBUG)
    jax.monitoring.register_event_duration_secs_listener(_watch.compiled)
    # The watcher reports and repairs what this warning is about.
    warnings.filterwarnings('ignore', message=READ_ERROR_WARNING)


@contextlib.contextmanager
def compile_notice(write: Callable[[str], None], message: str) -> Iterator[None]:
    """Calls `write(message)` at most once, when a long compile starts within the block."""
    if _watch is None:
        yield
        return
    with _watch.lock:
        _watch.notice = _Notice(write, message)
    try:
        yield
    finally:
        with _watch.lock:
            _watch.notice = None


def _delete_unreadable_entry(module_name: str, key: str) -> None:
    """JAX missed `key`: if its entry exists, JAX could not read it; delete it to be rewritten."""
    folder = Path(jax.config.jax_compilation_cache_dir)
    entry = folder / f'{key}{ENTRY_FILE_SUFFIXES[0]}'
    if not entry.exists():
        return      # an ordinary miss: the program was never compiled here
    try:
        for suffix in ENTRY_FILE_SUFFIXES:
            (folder / f'{key}{suffix}').unlink(missing_ok=True)
    except OSError as error:
        logger.warning('the compilation cache entry %s cannot be read, nor deleted (%s): delete '
                       'it, or set JAX_COMPILATION_CACHE_DIR to another folder', entry, error)
        return
    logger.warning('deleted an unreadable compilation cache entry for %s (%s); it is compiled '
                   'again and rewritten', module_name, entry)
