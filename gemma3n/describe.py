"""A model's architecture in words: its layers, parameter counts and memory."""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp

from gemma3n import cache as kv_cache
from gemma3n.checkpoints.loader import SIGLIP_PREFIXES, TOWERS_PREFIX
from gemma3n.config import AttentionType
from gemma3n.embedder import PER_LAYER_TABLE_PATH
from gemma3n.layout import serving_nbytes
from gemma3n.transformer import Gemma3nTransformer


def _count(shapes: Any, keep: Callable[[str], bool] = lambda path: True) -> int:
    flat = flax.traverse_util.flatten_dict(shapes, sep='/')
    return sum(math.prod(leaf.shape) for path, leaf in flat.items() if keep(path))


def parameter_counts(model: Gemma3nTransformer) -> dict[str, int]:
    """Parameter counts of `model` from its shapes alone (jax.eval_shape: no memory used).

    Keys: 'text' (the decoder), 'per_layer_table' (its per-layer embedding table); for a
    model with the SigLIP encoder 'vision' (encoder and projection into the text width); for
    one with the released towers each part of them (TOWER_TITLES).
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    # The towers declare their weights with logical axes (boxed): counted by their shapes.
    shapes = flax.linen.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)['params'])
    vision = _count(shapes, lambda path: path.startswith(SIGLIP_PREFIXES))
    towers = {part: _count(tree) for part, tree in shapes.get(TOWERS_PREFIX.rstrip('/'), {}).items()}
    counts = {'text': _count(shapes) - vision - sum(towers.values()),
              'per_layer_table': _count(shapes, lambda path: path == PER_LAYER_TABLE_PATH)}
    if vision:
        counts['vision'] = vision
    counts.update(towers)
    return counts


# The released towers' parts, as `gemma3n info` names them.
TOWER_TITLES = {'vision_tower': 'vision tower (MobileNet-V5)', 'embed_vision': 'vision embedder',
                'audio_tower': 'audio tower (conformer)', 'embed_audio': 'audio embedder'}


def _bytes(n: int) -> str:
    for unit, size in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
        if n >= size:
            return f'{n:,} bytes ({n / size:.2f} {unit})'
    return f'{n:,} bytes'


def describe_model(model: Gemma3nTransformer, title: str, dtype_name: str,
                   cache_length: int, int8_label: str = 'int8', int4_label: str = 'int4') -> str:
    """A text summary: layers (kind, K/V source, cache buffer), parameter counts, memory.

    `int8_label` and `int4_label` name the quantized weights in the memory lines (the command
    names its options).

    Example:
        >>> print(describe_model(Gemma3n_E4B(text_only=True), 'Gemma 3n E4B', 'bfloat16', 4096))
    """
    cfg = model.config
    sources = cfg.kv_source_layers()
    slots = kv_cache.cache_slots(cfg, cache_length)
    lines = [
        f'{title}',
        f'  {cfg.num_layers} layers, width {cfg.embed_dim}, FFN width {cfg.hidden_dim}, '
        f'{cfg.num_heads} query heads and {cfg.num_kv_heads} K/V heads of size {cfg.head_dim}, '
        f'vocabulary {cfg.num_embed:,}',
        f'  per-layer inputs of size {cfg.per_layer_input_dim}, {cfg.num_altup_inputs} AltUp '
        f'streams, LAuReL rank {cfg.laurel_rank}, sliding window {cfg.sliding_window_size}',
        f'  {cfg.num_unshared_layers} layers compute K/V; the last {cfg.num_shared_layers} reuse '
        'those of earlier layers',
        '',
        f'  layer  attention      K/V from   FFN sparsity  cache slots at {cache_length:,}',
    ]
    for i, kind in enumerate(cfg.attention_types):
        attention = 'global' if kind == AttentionType.GLOBAL else 'local sliding'
        source = 'own' if sources[i] == i else f'layer {sources[i]}'
        sparsity = f'{cfg.sparsity(i):.2f}' if cfg.sparsity(i) else '-'
        buffer = f'{slots[i]:,}' if i in slots else '-'
        lines.append(f'  {i:5d}  {attention:<13}  {source:<9}  {sparsity:<12}  {buffer}')

    counts = parameter_counts(model)
    total = sum(n for key, n in counts.items() if key != 'per_layer_table')
    towers = [f'  {title:<27}{counts[part]:>15,}' for part, title in TOWER_TITLES.items()
              if part in counts]
    dtype = jnp.dtype(dtype_name)
    itemsize = dtype.itemsize
    cache = jax.eval_shape(functools.partial(
        model.init_cache, batch_size=1, dtype=dtype, cache_length=cache_length))
    buffers = collections.Counter(slots.values())
    lines += [
        '',
        'parameters',
        f'  text decoder               {counts["text"]:>15,}',
        f'    per-layer embedding table {counts["per_layer_table"]:>14,}',
        *([f'  vision encoder + projection {counts["vision"]:>14,}'] if 'vision' in counts
          else towers or ['  vision encoder             none (text-only)']),
        f'  total                      {total:>15,}',
        '',
        f'memory in {dtype_name} (the loader casts every weight to it)',
        f'  weights                    {_bytes(total * itemsize)}',
        f'    text decoder             {_bytes(counts["text"] * itemsize)}',
        f'    per-layer embedding table {_bytes(counts["per_layer_table"] * itemsize)}',
        '  held by generate/chat from a checkpoint (per-layer table left in the file):',
        f'    {dtype_name:<24} {_bytes(serving_nbytes(model, dtype))}',
        f'    {int8_label:<24} {_bytes(serving_nbytes(model, dtype, quantize_int8=True))}',
        f'    {int4_label:<24} {_bytes(serving_nbytes(model, dtype, quantize_int4=True))}',
        f'  KV cache, 1 sequence of {cache_length:,} positions: '
        f'{_bytes(kv_cache.cache_nbytes(cache))}',
        f'    {len(slots)} layers hold K/V: '
        + ', '.join(f'{count} buffers of {size:,} slots'
                    for size, count in sorted(buffers.items(), reverse=True)),
    ]
    return '\n'.join(lines) + '\n'
