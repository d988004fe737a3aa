"""The page cache as each side of `bench.run` finds it: its own model files read in, the other
sides' model files dropped.

Both llama.cpp and ours memory-map their weights, so a side's load time and resident memory
depend on which files the kernel's page cache holds when it starts. Left to chance, that is
whatever the sides before it read:
- llama.cpp maps its GGUF with `MAP_POPULATE`: every page of the file the cache holds (or can
  take) counts in its resident memory. With our checkpoints filling the cache, the kernel
  reclaimed parts of its mapping, and the same Q8_0 server peaked anywhere from 5.62 to 7.69 GB
  on one day (`llama-bench`, a separate process started after the server, reported 7.59 every
  time). With its GGUF read in first, the server held the whole file after load and peaked at
  7.70 GB in each run.
- A file not in the cache is read from disk (~0.7 GB/s here) during the timed load: our sides
  read theirs in an untimed warm-up run (`--compile-cache`), llama.cpp's did not.

So before each side the bench reads that side's files in (the state of a second run of the same
model) and drops every other model file it has written (a machine that runs one model).
`POSIX_FADV_DONTNEED` needs no privileges; it leaves pages a running process maps.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench import common
from bench.llamacpp_gguf import GGUF_DIR

MODEL_SUFFIXES = ('.safetensors', '.gguf')
MODEL_FOLDERS = (common.WEIGHTS_DIR, common.RESULTS_DIR / 'converted', GGUF_DIR)
READ_CHUNK_BYTES = 64 << 20


def model_files(location: Path) -> set[Path]:
    """The weight files at `location` (a file, or a folder searched recursively), resolved:
    a link and its target are one file."""
    if location.is_file():
        return {location.resolve()}
    return {path.resolve() for path in location.rglob('*')
            if path.suffix in MODEL_SUFFIXES and path.is_file()}


def bench_model_files() -> set[Path]:
    """Every weight file the bench has written (checkpoints, conversions, GGUFs)."""
    return set().union(*(model_files(folder) for folder in MODEL_FOLDERS if folder.exists()))


def drop(paths: Iterable[Path]) -> None:
    """Asks the kernel to drop `paths`' cached pages (those no process maps)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_in(paths: Iterable[Path]) -> int:
    """Reads `paths` through once, so the page cache holds them; returns the bytes read."""
    buffer = bytearray(READ_CHUNK_BYTES)
    total = 0
    for path in paths:
        with open(path, 'rb', buffering=0) as f:
            while count := f.readinto(buffer):
                total += count
    return total


def settle(own: Iterable[Path]) -> dict[str, Any]:
    """The page cache for a side whose weights are `own` (files or folders): the bench's other
    model files dropped, `own` read in. Returns what was done, for the side's record."""
    mine = set().union(*(model_files(path) for path in own))
    others = bench_model_files() - mine
    drop(others)
    with common.Stopwatch() as watch:
        size = read_in(sorted(mine))
    return {'read_in_gb': size / common.GB, 'read_in_s': watch.seconds,
            'dropped_files': len(others)}
