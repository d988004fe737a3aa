"""Memory a request needs, estimated before it is allocated, and the memory there is for it.

A request whose size is known up front (a KV cache of `cache_length` positions for a batch, one
prefill chunk's activations) is checked here first, so that it is refused with the figures and
the parameter to change instead of failing inside XLA with RESOURCE_EXHAUSTED.

Example:
    >>> need = cache_bytes(config, 1, jnp.bfloat16, 32768) + prefill_chunk_bytes(
    ...     config, 1, 512, 32768, jnp.bfloat16)
    >>> check_fits('a KV cache of 32,768 positions', need, ('cache_length',))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gemma3n.cache import cache_slots
from gemma3n.config import TransformerConfig

F32_BYTES = 4
END_INDEX_BYTES = 4              # the cache's int32 position counter, per sequence
# One layer's float32 attention scores and their probabilities, each [B, N, chunk, keys]: an
# upper bound (XLA on CPU fuses more: the demo model's 32K-token prefill peaked 0.1 GB above its
# weights and cache where this counts 0.54 GB).
SCORE_COPIES = 2
# The FFN's gate, up and their product of one chunk live together.
FFN_COPIES = 3
MEMINFO = Path('/proc/meminfo')
# cgroup v2 limit and usage of this process's container (absent outside one, or 'max').
CGROUP_LIMIT = Path('/sys/fs/cgroup/memory.max')
CGROUP_USAGE = Path('/sys/fs/cgroup/memory.current')
# Usage counts the page cache; its inactive part is given back on demand (the "working set"
# that container runtimes watch leaves it out too).
CGROUP_STAT = Path('/sys/fs/cgroup/memory.stat')
RECLAIMABLE = 'inactive_file'
KIB = 1024


class InsufficientMemoryError(MemoryError):
    """A request refused before allocation: it cannot fit the memory available.

    Attributes:
        what: the request in words ('a KV cache of 100,000,000 positions for 1 sequence').
        need: its estimated size in bytes.
        available: the bytes available for it when it was checked.
        options: names of the parameters that shrink it ('cache_length', ...; none: nothing does).
        verb: what to do with them ('lower'; the weights: 'use' quantize='int8').
    """

    def __init__(self, what: str, need: int, available: int, options: Sequence[str],
                 verb: str = 'lower'):
        self.what, self.need, self.available = what, need, available
        self.options, self.verb = tuple(options), verb
        super().__init__(self.describe())

    def describe(self, option_names: Mapping[str, str] | None = None) -> str:
        """One line: the estimate, the memory available, the options to change (renamed by
        `option_names`, e.g. to command-line flags)."""
        names = [(option_names or {}).get(o, o) for o in self.options]
        advice = f': {self.verb} {" or ".join(names)}' if names else ''
        return (f'{self.what} needs about {format_bytes(self.need)} but only '
                f'{format_bytes(self.available)} of memory is available{advice}.')


def format_bytes(n: int) -> str:
    for unit, size in (('TiB', KIB ** 4), ('GiB', KIB ** 3), ('MiB', KIB ** 2), ('KiB', KIB)):
        if n >= size:
            return f'{n / size:,.1f} {unit}'
    return f'{n} bytes'


def cache_bytes(config: TransformerConfig, batch_size: int, dtype: Any, cache_length: int) -> int:
    """Bytes of `init_cache(config, batch_size, dtype, cache_length)`, in Python integers
    (no overflow whatever the length)."""
    per_slot = 2 * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize   # K and V
    slots = sum(cache_slots(config, cache_length).values())
    return batch_size * (slots * per_slot + END_INDEX_BYTES)


def prefill_chunk_bytes(config: TransformerConfig, batch_size: int, chunk_length: int,
                        cache_length: int, dtype: Any) -> int:
    """Estimated peak activations of one prefill chunk of `chunk_length` tokens per sequence
    against a cache of `cache_length` positions (weights and cache not included).

    The largest terms: one layer's attention scores (float32, each chunk query against every
    cached key of a global layer, or the ring plus the chunk of a sliding one), the FFN's
    hidden activations, the AltUp streams and per-layer inputs, and the last-token logits.
    """
    item = jnp.dtype(dtype).itemsize
    window = config.sliding_window_size or cache_length
    keys = max(min(window, cache_length) + chunk_length, cache_length)
    scores = SCORE_COPIES * config.num_heads * chunk_length * keys * F32_BYTES
    ffn = FFN_COPIES * chunk_length * config.hidden_dim * max(item, F32_BYTES)
    streams = 2 * config.num_altup_inputs * chunk_length * config.embed_dim * max(item, F32_BYTES)
    per_layer = 2 * chunk_length * config.num_layers * config.per_layer_input_dim * F32_BYTES
    logits = 2 * config.num_embed * F32_BYTES
    return batch_size * (scores + ffn + streams + per_layer + logits)


def host_available_bytes() -> int | None:
    """Memory the host can still give this process: MemAvailable, bounded by the container's
    cgroup limit; None where neither can be read (not Linux)."""
    available = None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith('MemAvailable:'):
                available = int(line.split()[1]) * KIB
    except OSError:
        pass
    try:
        limit = CGROUP_LIMIT.read_text().strip()
        if limit != 'max':
            stat = dict(line.split() for line in CGROUP_STAT.read_text().splitlines())
            used = int(CGROUP_USAGE.read_text()) - int(stat.get(RECLAIMABLE, 0))
            left = int(limit) - used
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def available_bytes(device: jax.Device | None = None) -> int | None:
    """Memory free for new arrays on `device` (default: JAX's first device): the host's for a
    CPU, the device's own statistics for an accelerator; None when unknown."""
    device = device or jax.local_devices()[0]
    if device.platform == 'cpu':
        return host_available_bytes()
    stats = device.memory_stats() or {}
    if 'bytes_limit' not in stats:
        return None
    return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))


def check_fits(what: str, need: int, options: Sequence[str],
               device: jax.Device | None = None, verb: str = 'lower') -> None:
    """Raises InsufficientMemoryError when `need` bytes exceed the memory available (no check
    where that is unknown)."""
    available = available_bytes(device)
    if available is not None and need > available:
        raise InsufficientMemoryError(what, need, available, options, verb)
