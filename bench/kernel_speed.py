"""Our decode kernels alone, per weight shape of a decode step at E4B widths: milliseconds and
GB/s of weight read per call (best of `--repeats`, random operands), for each count of x rows in
`--rows` (the server's step runs 1, 2, 4, 8 or 16), with each time's ratio to the one-row time, beside
the machine's memory bandwidth and load. Each weight is larger than the caches only for the
biggest shapes; the smaller ones show the kernels' compute speed.

    python -m bench.kernel_speed [--kinds bf16,int8,int4,int8_rows] [--rows 1,2,4,8] [--repeats 20]

Runs the kernels of whatever `gemma3n` is imported, so `PYTHONPATH=<other checkout> python
bench/kernel_speed.py` (the script by path, so that the checkout's `gemma3n` comes first) times
that checkout's kernels with this script (its `int8_rows` rows are skipped if it has none).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, machine
from gemma3n.layers import decode_kernels
from gemma3n.layers.int8 import INT8_MAX

# (name, N, K) of the products a decode step makes, at E4B widths: y [M, N] = x [M, K] · w[N, K]ᵀ.
SHAPES = [('attention q / o', 2048, 2048), ('FFN gate + up', 32768, 2048),
          ('FFN down', 2048, 16384), ('LM head / 4', 65536, 2048)]
# The sparse FFN's down rows: C kept rows of [F, D] (E4B: 2 · 5% of 16384).
KEPT_ROWS, FFN_DIM, MODEL_DIM = 1639, 16384, 2048
# Bytes read per weight value.
BYTES_PER_VALUE = {'bf16': 2.0, 'int8': 1.0, 'int4': 0.5 + 2 / 32, 'int8_rows': 1.0}


def _operands(kind: str, rows: int, n: int, k: int, rng: np.random.Generator) -> tuple:
    """The kernel's operands and its result type."""
    def s8(shape, low=-128):
        return jnp.asarray(rng.integers(low, 128, shape), jnp.int8)
    if kind == 'bf16':
        return (jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16),
                jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)), jnp.float32
    if kind == 'int8':
        # x as the int8 representation quantizes activations: within +-127.
        return (s8((rows, k), low=-INT8_MAX), s8((n, k))), jnp.int32
    scale = jnp.asarray(rng.standard_normal((n, k // 32)) * 0.01, jnp.float16)
    return (s8((rows, k), low=-INT8_MAX), jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8),
            scale), jnp.float32


def time_call(fn, operands: tuple, repeats: int) -> float:
    fn(*operands).block_until_ready()
    return common.best_of(lambda: fn(*operands).block_until_ready(), repeats)


def _kernels(kind: str, rows: int, rng: np.random.Generator) -> list:
    """(weight name, N, K, jitted kernel, operands) per weight shape of `kind` at `rows` rows."""
    if kind == 'int8_rows':
        w = jnp.asarray(rng.integers(-128, 128, (FFN_DIM, MODEL_DIM)), jnp.int8)
        ids = jnp.asarray(np.sort(rng.choice(FFN_DIM, KEPT_ROWS, replace=False)), jnp.int32)
        x = jnp.asarray(rng.integers(-128, 128, (rows, KEPT_ROWS)), jnp.int8)
        return [(f'sparse FFN down rows ({KEPT_ROWS} of {FFN_DIM})', KEPT_ROWS, MODEL_DIM,
                 jax.jit(decode_kernels.gathered_rows), (x, ids, w))]
    shapes = []
    for name, n, k in SHAPES:
        operands, out = _operands(kind, rows, n, k, rng)
        result = jax.ShapeDtypeStruct((rows, n), out)
        fn = jax.jit(lambda *o, kind=kind, result=result: decode_kernels.call(kind, result, *o))
        shapes.append((name, n, k, fn, operands))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--kinds', default='bf16,int8,int4,int8_rows')
    parser.add_argument('--rows', default='1,2,4,8',
                        help=f'comma-separated counts of x rows, each 1 to {decode_kernels.MAX_ROWS}')
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args()
    row_counts = sorted(int(r) for r in args.rows.split(','))
    if not all(1 <= r <= decode_kernels.MAX_ROWS for r in row_counts):
        parser.error(f'--rows takes counts from 1 to {decode_kernels.MAX_ROWS}, got {args.rows!r}')
    rng = np.random.default_rng(0)
    bandwidth = machine.threaded_read_bandwidth(np.ones(machine.ARRAY_BYTES // 4, np.float32))
    print(f'kernels: {decode_kernels.active_isa()}; load average {os.getloadavg()[0]:.2f}; '
          f'memory read bandwidth {bandwidth["threaded_gb_s"]:.1f} GB/s')
    rows_of = {}      # (kind, weight) -> table rows, one per count of x rows
    for kind in args.kinds.split(','):
        if kind == 'int8_rows' and kind not in decode_kernels.TARGETS:
            continue
        one_row = {}
        for rows in row_counts:
            for name, n, k, fn, operands in _kernels(kind, rows, rng):
                seconds = time_call(fn, operands, args.repeats)
                one_row.setdefault(name, seconds if rows == 1 else None)
                base = one_row[name]
                gb = n * k * BYTES_PER_VALUE[kind] / common.GB
                rows_of.setdefault((kind, name), []).append([
                    kind, name, f'{n} x {k}', rows, f'{1e3 * seconds:.3f}', f'{gb / seconds:.1f}',
                    f'{seconds / base:.2f}' if base else '-'])
    table = [row for rows in rows_of.values() for row in rows]
    print(common.format_table(['kernel', 'weight', 'N x K', 'rows', 'ms', 'GB/s', 'vs 1 row'],
                              table))
    print(f'load average at the end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
    main()
