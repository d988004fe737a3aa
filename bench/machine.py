"""The machine's memory read bandwidth, and the decode rate it allows for a benchmark size.

A decode step has to stream every weight it uses from memory once, so
    ceiling tokens/s = read bandwidth / bytes of weights read per token.
Bandwidth is timed as the sum of a 1 GiB array (larger than any cache): numpy (one thread), a
compiled JAX sum (XLA's thread pool, all cores), the median of a few runs each (on a shared
virtual machine single runs are sometimes far off in either direction), and the way a decode
step reads (one thread per core each streaming its own slice, as the decode kernels split a
weight's rows), the best of several runs with their spread; and, where our decode kernels are
built, the bf16 kernel itself reading a 1 GiB weight for one row of activations (what a decode
step does), best of several with the spread. That one is the machine's figure where the kernels
are built: on this 2-core VM its spread over 14 runs was 27.9-30.9 GB/s while the threaded numpy
sums gave 24.0-36.8 (2026-12-02); elsewhere, the fastest of the others.

Run by `bench.run`; by hand:
    python -m bench.machine --size reduced --out machine.json
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

ARRAY_BYTES = 1 << 30
REPEATS = 7


def threaded_read_bandwidth(host: np.ndarray, threads: int | None = None) -> dict[str, float]:
    """GB/s of `host` read by one thread per core, each summing its own contiguous slice (numpy
    releases the GIL inside the sum): best, median and worst of REPEATS runs."""
    threads = threads or os.cpu_count() or 1
    slices = np.array_split(host, threads)
    with ThreadPoolExecutor(threads) as pool:
        def read_all():
            return sum(pool.map(np.sum, slices))
        read_all()
        times = []
        for _ in range(REPEATS):
            with common.Stopwatch() as watch:
                read_all()
            times.append(watch.seconds)
        times.sort()
    rates = [host.nbytes / t / common.GB for t in times]
    return {'threaded_gb_s': rates[0], 'threaded_median_gb_s': float(np.median(rates)),
            'threaded_worst_gb_s': rates[-1], 'threads': threads}


def kernel_read_bandwidth() -> dict[str, float]:
    """GB/s of our bf16 decode kernel reading a 1 GiB weight (one row of activations, as a
    decode step's products read their weights): best, median and worst of REPEATS runs; empty
    when the kernels are not built here."""
    from gemma3n.layers import decode_kernels
    if decode_kernels.active_isa() is None:
        return {}
    k = 2048
    w = jnp.ones((ARRAY_BYTES // common.BF16_BYTES // k, k), jnp.bfloat16)
    x = jnp.ones((1, k), jnp.bfloat16)
    product = jax.jit(lambda x, w: decode_kernels.call(
        'bf16', jax.ShapeDtypeStruct((1, w.shape[0]), jnp.float32), x, w))
    product(x, w).block_until_ready()
    times = []
    for _ in range(REPEATS):
        with common.Stopwatch() as watch:
            product(x, w).block_until_ready()
        times.append(watch.seconds)
    rates = sorted((ARRAY_BYTES / t / common.GB for t in times), reverse=True)
    return {'kernel_gb_s': rates[0], 'kernel_median_gb_s': float(np.median(rates)),
            'kernel_worst_gb_s': rates[-1], 'kernel_isa': decode_kernels.active_isa()}


def read_bandwidth() -> dict[str, float]:
    """GB/s of a large-array sum: numpy float32 (1 thread), JAX bfloat16 (all threads) and
    numpy in one thread per core (`threaded_read_bandwidth`)."""
    host = np.ones(ARRAY_BYTES // 4, np.float32)
    threaded = threaded_read_bandwidth(host)
    numpy_s = common.median_of(lambda: host.sum(), REPEATS)
    device = jnp.ones(ARRAY_BYTES // common.BF16_BYTES, jnp.bfloat16)
    total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    total(device).block_until_ready()
    jax_s = common.median_of(lambda: total(device).block_until_ready(), REPEATS)
    numpy_gbs, jax_gbs = ARRAY_BYTES / numpy_s / common.GB, ARRAY_BYTES / jax_s / common.GB
    kernel = kernel_read_bandwidth()
    return {'numpy_1thread_gb_s': numpy_gbs, 'jax_all_threads_gb_s': jax_gbs, **threaded, **kernel,
            'read_gb_s': kernel.get('kernel_gb_s')
                         or max(numpy_gbs, jax_gbs, threaded['threaded_gb_s'])}


def decode_ceiling(size: str, read_gb_s: float) -> dict[str, object]:
    config = common.bench_config(size)
    weights = common.decode_weights_read(config)
    per_token_bytes = weights['total'] * common.BF16_BYTES
    return {'params': common.param_count(config), 'decode_weights_read': weights,
            'decode_bytes_per_token_bf16': per_token_bytes,
            'ceiling_tok_s_bf16': read_gb_s * common.GB / per_token_bytes,
            'ceiling_tok_s_int8': read_gb_s * common.GB / weights['total']}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--size', choices=common.SIZES, required=True)
    parser.add_argument('--out', type=Path, required=True)
    args = parser.parse_args()
    bandwidth = read_bandwidth()
    common.write_json({**bandwidth, **decode_ceiling(args.size, bandwidth['read_gb_s'])}, args.out)


if __name__ == '__main__':
    main()
