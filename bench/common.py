"""Shared helpers of the benchmarks: sizes, random weights on disk, timing, memory, tables, JSON.

The two sides of a benchmark (ours in JAX, `transformers` in torch) run in separate processes so
each one's peak resident memory is its own. This module therefore imports neither JAX, torch nor
`gemma3n` at import time: the functions that need them import them when called.

Example:
    >>> weights = ensure_weights('reduced')            # writes bench/results/weights/reduced once
    >>> with Stopwatch() as watch:
    ...     run_something()
    >>> print(watch.seconds)
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import process_memory

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / 'bench' / 'results'        # git-ignored
WEIGHTS_DIR = RESULTS_DIR / 'weights'
GB = 1e9
SIZES = ('tiny', 'reduced', 'full')   # tiny: a seconds-long smoke test of the pipeline

# The reduced size: E4B widths, 10 layers of which the last 5 reuse K/V, as E4B's last 15 of 35
# do (5 is a whole LLLLG pattern, so HF's and our K/V source rules pick the same layers), and
# activation sparsity on the first 3 (E4B: 10 of 35).
REDUCED_LAYERS = 10
REDUCED_SHARED_LAYERS = 5
REDUCED_SPARSE_LAYERS = 3
# The tiny size: every mechanism (a 64-token window, so the prompts fill sliding rings) at small widths.
TINY_WIDTHS = dict(embed_dim=128, hidden_dim=512, num_heads=4, num_kv_heads=2, head_dim=32, num_embed=1024,
                   per_layer_input_dim=16, laurel_rank=16, sliding_window_size=64)

WEIGHT_SEED = 20250701
PROMPT_SEED = 7
PROMPT_LENGTHS = (128, 512)
# Random weights: norm scales 1 + SCALE_NOISE * N(0, 1); weights N(0, 1 / fan_in), so activations
# keep unit scale through the depth (same scheme as tests/hf_oracle.py, but streamed in bfloat16).
SCALE_NOISE = 0.1
GENERATE_CHUNK = 1 << 26          # values drawn per chunk: bounds the float32 scratch memory
HF_PREFIX = 'model.'              # Gemma3nForCausalLM keeps the text model under `model.`
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
STAMP_FILE = 'bench_stamp.json'   # what the weights were generated from; regenerate on mismatch
SAFETENSORS_ALIGN = 8             # the format pads the header so data starts 8-byte aligned
BF16_BYTES = 2
# JAX's (and so our sides') compilation cache folder; bench.run --compile-cache sets it.
COMPILATION_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'


# ---- sizes ---------------------------------------------------------------------------------------

def bench_config(size: str) -> Any:
    """The `TransformerConfig` benchmarked at `size` ('tiny', 'reduced' or 'full' = E4B text)."""
    from gemma3n.config import TransformerConfig
    from gemma3n.models import E4B_HIDDEN_DIM, e4b_config
    if size == 'full':
        return e4b_config()
    if size == 'reduced':
        return TransformerConfig.gemma3n(
            num_layers=REDUCED_LAYERS, num_shared_layers=REDUCED_SHARED_LAYERS,
            num_sparse_layers=REDUCED_SPARSE_LAYERS, hidden_dim=E4B_HIDDEN_DIM)
    if size == 'tiny':
        return TransformerConfig.gemma3n(
            num_layers=REDUCED_LAYERS, num_shared_layers=REDUCED_SHARED_LAYERS,
            num_sparse_layers=REDUCED_SPARSE_LAYERS, **TINY_WIDTHS)
    raise ValueError(f'size must be one of {SIZES}, got {size!r}.')


def prompt_tokens(length: int, vocab: int) -> np.ndarray:
    """The [1, length] int32 prompt both sides use: seeded random ids, never padding (0)."""
    return np.random.default_rng(PROMPT_SEED + length).integers(
        1, vocab, size=(1, length), dtype=np.int32)


def decode_weights_read(config: Any) -> dict[str, int]:
    """Weights read per decoded token, by part: every parameter once, except the per-layer table
    (only this token's row [num_layers, P] is gathered) and the tied embedding, whose full read is
    the output head (the input side gathers one row). K/V-shared layers have no K/V weights.
    """
    from gemma3n.checkpoints import hf_mapping
    from gemma3n.embedder import PER_LAYER_TABLE_PATH
    parts = {'layers (owning K/V)': 0, 'layers (K/V-shared)': 0, 'output head': 0,
             'per-layer table row': 0, 'other': 0}
    for entry in hf_mapping.mapping_entries(config, hf_vocab_size=config.num_embed):
        count = math.prod(entry.shape)
        if entry.path == PER_LAYER_TABLE_PATH:
            parts['per-layer table row'] += config.num_layers * config.per_layer_input_dim
        elif entry.path == 'embedder/input_embedding':
            parts['output head'] += count
        elif entry.path.startswith('layer_'):
            layer = int(entry.path.split('/')[0].split('_')[1])
            owns = config.kv_source_layers()[layer] == layer
            parts['layers (owning K/V)' if owns else 'layers (K/V-shared)'] += count
        else:
            parts['other'] += count
    parts['total'] = sum(parts.values())
    return parts


def param_count(config: Any) -> int:
    from gemma3n.checkpoints import hf_mapping
    return sum(math.prod(e.shape) for e in hf_mapping.mapping_entries(config, hf_vocab_size=config.num_embed))


# ---- random weights on disk ----------------------------------------------------------------------

def weights_dir(size: str) -> Path:
    return WEIGHTS_DIR / size


def ensure_weights(size: str, directory: Path | None = None) -> Path:
    """A Hugging Face style directory (config.json + model.safetensors, bfloat16) of random weights.

    Both sides load this one file, so they run the same numbers. It is written once, tensor by
    tensor in bounded chunks (the full size never exists in memory, nor in float32), and reused
    while its stamp matches. Runs in a subprocess so the caller's memory stays small.
    """
    directory = directory or weights_dir(size)
    stamp = {'size': size, 'seed': WEIGHT_SEED, 'scale_noise': SCALE_NOISE}
    stamp_path = directory / STAMP_FILE
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp \
            and (directory / WEIGHTS_FILE).is_file():
        return directory
    run_python(['-m', 'bench.make_weights', '--size', size, '--out', str(directory)])
    stamp_path.write_text(json.dumps(stamp))
    return directory


def write_random_safetensors(path: Path, tensors: Sequence[tuple[str, tuple[int, ...], float, bool]],
                             seed: int, metadata: dict[str, str] | None = None) -> None:
    """Streams random bfloat16 tensors into one safetensors file.

    tensors: (name, shape, std, is_scale) each; scales are 1 + std * N(0, 1), weights std * N(0, 1).
    metadata: the file's metadata (default: that of a PyTorch-written file).
    The header is written first (the format is: u64 header length, JSON header, raw data), then
    each tensor's data chunk by chunk, each tensor from its own seed-derived generator.
    """
    import ml_dtypes
    header: dict[str, Any] = {'__metadata__': metadata or {'format': 'pt'}}
    offset = 0
    for name, shape, _, _ in tensors:
        size = math.prod(shape) * BF16_BYTES
        header[name] = {'dtype': 'BF16', 'shape': list(shape), 'data_offsets': [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(',', ':')).encode()
    encoded += b' ' * (-len(encoded) % SAFETENSORS_ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix('.partial')
    with open(partial, 'wb') as f:
        f.write(struct.pack('<Q', len(encoded)))
        f.write(encoded)
        for index, (name, shape, std, is_scale) in enumerate(tensors):
            rng = np.random.default_rng([seed, index])
            remaining = math.prod(shape)
            while remaining:
                n = min(remaining, GENERATE_CHUNK)
                chunk = rng.standard_normal(n, dtype=np.float32)
                chunk *= np.float32(std)
                if is_scale:
                    chunk += np.float32(1.0)
                f.write(chunk.astype(ml_dtypes.bfloat16).tobytes())
                remaining -= n
    partial.replace(path)


# ---- timing and memory ---------------------------------------------------------------------------

class Stopwatch:
    """Wall time of a `with` block, in `seconds`.

    Example:
        >>> with Stopwatch() as watch:
        ...     time.sleep(0.1)
        >>> round(watch.seconds, 1)
        0.1
    """

    def __enter__(self) -> 'Stopwatch':
        self.seconds = float('nan')
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._start


def _timings(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        with Stopwatch() as watch:
            fn()
        times.append(watch.seconds)
    return times


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn` (the least disturbed by other load)."""
    return min(_timings(fn, repeats))


def median_of(fn: Callable[[], Any], repeats: int) -> float:
    return float(np.median(_timings(fn, repeats)))


RANDOM_BLOCK_ELEMENTS = 1 << 26    # leafwise_random_params: at most this many drawn at once


def leafwise_random_params(model: Any, dtype: Any, scale: float) -> Any:
    """Random weights N(0, scale^2) of `model`'s tree in `dtype`, made leaf by leaf: one
    `model.init` program would hold every float32 weight and its temporaries at once (over
    20 GB at the reduced size), which would then be the process's peak memory. A large leaf is
    drawn in blocks of rows into its final array: E4B's per-layer table, drawn whole, would
    take 37 GB of float32 values and random bits."""
    import jax
    import jax.numpy as jnp
    tokens = jnp.ones((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    normal = jax.jit(lambda key, shape: (scale * jax.random.normal(key, shape, jnp.float32)
                                         ).astype(dtype), static_argnums=1)

    def leaf_values(key: Any, shape: tuple[int, ...]) -> Any:
        row = math.prod(shape[1:])
        if not shape or math.prod(shape) <= RANDOM_BLOCK_ELEMENTS or row > RANDOM_BLOCK_ELEMENTS:
            return jax.block_until_ready(normal(key, shape))
        block = RANDOM_BLOCK_ELEMENTS // row
        values = np.empty(shape, jnp.dtype(dtype))
        for start in range(0, shape[0], block):
            rows = min(block, shape[0] - start)
            values[start:start + rows] = normal(jax.random.fold_in(key, start), (rows, *shape[1:]))
        return jnp.asarray(values)

    keys = jax.random.split(jax.random.key(0), len(leaves))
    return tree.unflatten([leaf_values(key, leaf.shape) for key, leaf in zip(keys, leaves)])


def machine_info() -> dict[str, Any]:
    """What ran the benchmark, and how busy the machine was when it started."""
    flags = ''
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith('flags')), '')
    except OSError:
        pass
    return {
        'cpus': os.cpu_count(),
        'load_average': os.getloadavg(),
        'memory_available_gb': process_memory.memory_available_bytes() / GB,
        'platform': platform.platform(),
        'avx512': ' avx512f ' in flags,
        'avx512_bf16': ' avx512_bf16 ' in flags,
        'python': sys.version.split()[0],
    }


# ---- processes and results -----------------------------------------------------------------------

def run_python(args: Sequence[str], env: dict[str, str] | None = None) -> None:
    """Runs `python args...` from the repository root (with `env` added to the environment);
    raises if it fails."""
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT,
                            env=None if env is None else {**os.environ, **env})
    if result.returncode:
        raise RuntimeError(f'`python {" ".join(args)}` failed with exit status {result.returncode}.')


def write_json(data: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_to_json))
    return path


def _to_json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    raise TypeError(f'Cannot write {type(value).__name__} as JSON.')


def results_path(name: str) -> Path:
    """bench/results/<name>-<UTC time>.json."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    return RESULTS_DIR / f'{name}-{stamp}.json'


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats get 3 significant digits, None prints as '-'."""
    def cell(value: Any) -> str:
        if value is None:
            return '-'
        if isinstance(value, float):
            return f'{value:.3g}' if abs(value) < 1000 else f'{value:.0f}'
        return str(value)

    cells = [[cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


# ---- the measurement protocol both sides follow ----------------------------------------------------

class GreedyRunner:
    """What a side implements: greedy generation of one sequence with its own KV cache.

    `start(tokens [1, L], max_new_tokens)` prefills a fresh cache and returns the last prompt
    position's logits [V] (float32 numpy) and the greedy token; `step()` feeds the previous greedy
    token and returns the next one (as an int, so the work is finished when it returns).
    """

    def start(self, tokens: np.ndarray, max_new_tokens: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def step(self) -> int:
        raise NotImplementedError


def measure_side(runner: GreedyRunner, vocab: int, decode_tokens: int, repeats: int) -> dict[str, Any]:
    """The benchmark protocol, identical for both sides.

    Time to first token is the very first prefill (128 tokens) of the process, compilation
    included; prefill and decode rates are best-of-`repeats` / steady-state runs after a warm-up
    call (the 512-token prefill's first call, compilation included, is reported separately).
    """
    prompts = {length: prompt_tokens(length, vocab) for length in PROMPT_LENGTHS}
    short, long = PROMPT_LENGTHS
    result: dict[str, Any] = {}
    with Stopwatch() as watch:
        logits, first = runner.start(prompts[short], 1)
    result['ttft_s'] = watch.seconds
    result['first_logits'] = logits
    result['first_token'] = first
    for length in PROMPT_LENGTHS:
        with Stopwatch() as watch:
            runner.start(prompts[length], 1)
        result[f'prefill{length}_first_call_s'] = watch.seconds
        seconds = best_of(lambda: runner.start(prompts[length], 1), repeats)
        result[f'prefill{length}_s'] = seconds
        result[f'prefill{length}_tok_s'] = length / seconds
    runner.start(prompts[short], decode_tokens + 2)
    with Stopwatch() as watch:
        tokens = [runner.step()]
    result['decode_first_step_s'] = watch.seconds
    step_times = []
    for _ in range(decode_tokens):
        with Stopwatch() as watch:
            tokens.append(runner.step())
        step_times.append(watch.seconds)
    result['decode_step_s'] = step_times
    result['decode_tok_s'] = decode_tokens / sum(step_times)
    result['decode_median_step_s'] = float(np.median(step_times))
    result['decode_tokens'] = [first, *tokens]
    return result


def side_main(description: str, build: Callable[..., tuple[GreedyRunner, dict[str, Any]]],
              variants: Sequence[str] = ()) -> None:
    """Command line of one side: loads (timed), measures, writes its JSON and first logits.

    `build(weights_dir, size[, variant])` returns the runner and facts about the side (names,
    versions); `variant` is passed when the side has `variants`.
    """
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--size', choices=SIZES, required=True)
    parser.add_argument('--weights', type=Path, required=True)
    parser.add_argument('--out', type=Path, required=True, help='JSON file to write')
    parser.add_argument('--decode-tokens', type=int, default=16)
    parser.add_argument('--repeats', type=int, default=2)
    if variants:
        parser.add_argument('--variant', choices=variants, default=variants[0])
    args = parser.parse_args()

    rss_start = process_memory.current_rss_bytes()
    with Stopwatch() as watch:
        runner, info = build(args.weights, args.size, *([args.variant] if variants else []))
    info.update(load_s=watch.seconds, rss_before_load_gb=rss_start / GB,
                rss_after_load_gb=process_memory.current_rss_bytes() / GB)
    # The model's vocabulary, the same for every side (a converted checkpoint's config.json
    # writes HF's larger `vocab_size`, which the bench's own checkpoint sets equal to it).
    vocab = bench_config(args.size).num_embed
    result = measure_side(runner, vocab, args.decode_tokens, args.repeats)
    np.save(args.out.with_suffix('.logits.npy'), result.pop('first_logits'))
    status = process_memory.status_bytes()
    result.update(info, peak_rss_gb=process_memory.peak_rss_bytes() / GB, rss_end_gb=status['VmRSS'] / GB,
                  rss_private_end_gb=status['RssAnon'] / GB, rss_file_end_gb=status['RssFile'] / GB)
    write_json(result, args.out)
