"""The machine's memory read bandwidth, and the decode rate it allows for a benchmark size.

A decode step has to stream every weight it uses from memory once, so
    ceiling tokens/s = read bandwidth / bytes of weights read per token.
Bandwidth is timed as the sum of a 1 GiB array (larger than any cache): numpy (one thread) and a
compiled JAX sum (XLA's thread pool, all cores), the median of a few runs each (on a shared
virtual machine single runs are sometimes far off in either direction); the faster is the
machine's figure.

Run by `bench.run`; by hand:
    python -m bench.machine --size reduced --out machine.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

ARRAY_BYTES = 1 << 30
REPEATS = 7


def read_bandwidth() -> dict[str, float]:
    """GB/s of a large-array sum: numpy float32 (1 thread) and JAX bfloat16 (all threads)."""
    host = np.ones(ARRAY_BYTES // 4, np.float32)
    numpy_s = common.median_of(lambda: host.sum(), REPEATS)
    device = jnp.ones(ARRAY_BYTES // common.BF16_BYTES, jnp.bfloat16)
    total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    total(device).block_until_ready()
    jax_s = common.median_of(lambda: total(device).block_until_ready(), REPEATS)
    numpy_gbs, jax_gbs = ARRAY_BYTES / numpy_s / common.GB, ARRAY_BYTES / jax_s / common.GB
    return {'numpy_1thread_gb_s': numpy_gbs, 'jax_all_threads_gb_s': jax_gbs,
            'read_gb_s': max(numpy_gbs, jax_gbs)}


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
