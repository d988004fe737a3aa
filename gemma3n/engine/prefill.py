"""Chunked prefill: how prompts are cut into chunks fed through the KV cache one at a time.

Peak memory is then the weights, the cache and one chunk's activations, whatever the prompt
length, and the compiled chunk program depends on the chunk width only: full chunks are
`chunk_length` wide, and a last (or only) chunk is padded to a power of two no wider, so short
prompts stay cheap and the set of widths is fixed.

Each sequence of a batch is cut on its own: row b of a chunk holds sequence b's next tokens
(right-padded), and the cache's per-sequence positions continue where its last chunk ended, so
ragged prompts need no alignment. A cut never falls inside an image's run of placeholders,
whose attention is bidirectional: the whole run must be in one call. Sliding-window layers need
nothing here: a chunk attends to the ring as it was plus its own K/V before writing (see
`gemma3n.attention`).

Example:
    >>> for chunk in plan_chunks([np.arange(2, 1500), np.arange(2, 40)], 512):
    ...     chunk.tokens.shape, chunk.starts, chunk.holds_last
    ((2, 512), array([0, 0]), array([False,  True]))     # the first of three
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma3n import memory, multimodal
from gemma3n.config import TransformerConfig
from gemma3n.layers import special_ids

DEFAULT_PREFILL_CHUNK = 512
MIN_PREFILL_BUCKET = 16   # a last chunk is padded to a power of two at least this long


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One call of the prefill.

    tokens: [B, W] int32, row b the tokens [starts[b], starts[b] + n_b) of sequence b, padded.
    starts: [B] where in each sequence the chunk begins.
    holds_last: [B] bool, the chunk holds the sequence's last token (whose logits are kept).
    """
    tokens: np.ndarray
    starts: np.ndarray
    holds_last: np.ndarray


def chunk_width(longest: int, chunk_length: int) -> int:
    """The padded width of a chunk whose longest row has `longest` tokens."""
    return min(chunk_length, max(MIN_PREFILL_BUCKET, 1 << (longest - 1).bit_length()))


def cut_points(row: np.ndarray, chunk_length: int) -> list[int]:
    """Ends of the chunks of one sequence [L]: each at most `chunk_length` after the previous
    one, moved back to the start of a run of image placeholders it would split."""
    is_soft = row == special_ids.IMAGE_PLACEHOLDER
    ends, start = [], 0
    while start < len(row):
        end = min(start + chunk_length, len(row))
        if end < len(row) and is_soft[end - 1] and is_soft[end]:
            while end > start and is_soft[end - 1]:
                end -= 1
            if end == start:
                raise ValueError(
                    f'prefill_chunk {chunk_length} is too short for an image\'s run of '
                    f'{int(_run_length(is_soft, start))} soft tokens: it must be longer.')
        ends.append(end)
        start = end
    return ends


def _run_length(is_soft: np.ndarray, start: int) -> int:
    stop = start
    while stop < len(is_soft) and is_soft[stop]:
        stop += 1
    return stop - start


def plan_chunks(rows: list[np.ndarray], chunk_length: int) -> list[Chunk]:
    """The chunks that feed `rows` (one token sequence each, images already expanded)."""
    if chunk_length < 1:
        raise ValueError(f'prefill_chunk must be at least 1, got {chunk_length}.')
    bounds = [[0] + cut_points(row, chunk_length) for row in rows]
    count = max(len(b) for b in bounds) - 1
    chunks = []
    for k in range(count):
        starts = np.array([b[min(k, len(b) - 1)] for b in bounds])
        ends = np.array([b[min(k + 1, len(b) - 1)] for b in bounds])
        tokens = np.zeros((len(rows), chunk_width(int((ends - starts).max()), chunk_length)),
                          np.int32)
        for i, row in enumerate(rows):
            tokens[i, :ends[i] - starts[i]] = row[starts[i]:ends[i]]
        lengths = np.array([len(row) for row in rows])
        chunks.append(Chunk(tokens=tokens, starts=starts,
                            holds_last=(ends > starts) & (ends == lengths)))
    return chunks


def expand_rows(rows: list[np.ndarray], kinds: list[tuple[int, int, multimodal.BlockIds]]
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each sequence with its markers expanded into blocks, one kind after the other.

    kinds: (blocks per sequence, soft tokens per block, ids) of each kind (images, audio).
    Returns the expanded rows and, per kind, block_start [B, count]: where each block begins in
    the fully expanded rows.
    """
    padded = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
    for b, row in enumerate(rows):
        padded[b, :len(row)] = row
    tokens, _, starts = multimodal.expand_blocks(jnp.asarray(padded), kinds)
    extra = sum(count * (multimodal.block_length(num_soft) - 1) for count, num_soft, _ in kinds)
    expanded = np.asarray(tokens)
    return ([expanded[b, :len(row) + extra] for b, row in enumerate(rows)],
            [np.asarray(start) for start in starts])


def check_memory(config: TransformerConfig, *, batch_size: int, longest_prompt: int,
                 prefill_chunk: int, cache_length: int, dtype: Any, new_cache: bool) -> None:
    """Refuses (`memory.InsufficientMemoryError`) a generation whose new cache (when
    `new_cache`) and prefill chunk cannot fit the memory available, before any allocation."""
    width = chunk_width(longest_prompt, prefill_chunk)
    need = memory.prefill_chunk_bytes(config, batch_size, width, cache_length, dtype)
    sequences = f'{batch_size} sequence' + ('s' if batch_size > 1 else '')
    what = f'prefilling {sequences} {width} tokens at a time'
    options = ['prefill_chunk']
    if new_cache:
        need += memory.cache_bytes(config, batch_size, dtype, cache_length)
        what = (f'a KV cache of {cache_length:,} positions for {sequences}, prefilled {width} '
                'tokens at a time,')
        options.insert(0, 'cache_length')
    if batch_size > 1:
        options.append('the number of prompts')
    memory.check_fits(what, need, options)
