"""One attention layer's share of a decode step: write one token's K/V into the cache, attend.

    python -m bench.cache_write [--slots 256,1024,4096] [--repeats 7]

Times, per cache length S (one sequence, E4B's 2 K/V heads of 256 and 8 query heads), the
compiled write of one token's K and V into donated [1, S, 2, 256] buffers followed by attention
over them (logits, softmax, values), with the buffers stored
- `bf16`: as bfloat16, written with a scatter: XLA's CPU backend widens the buffer to float32
  around it and writes it whole, then copies it into the donated buffer (main before 2026-12-02);
- `bits`: as their bits in uint16 (tried on 2026-12-02, branch step7's history): the write
  updates the buffer in place, and the attention reads it through a bitcast;
- `select`: as bfloat16, the token's slot chosen by a select over the whole buffer (one pass,
  elementwise, so XLA may write it in place);
and each alone: the write (`write`), the attention over a buffer already written (`read`).
Prints the median ms of `--repeats` runs of 100 calls each, alternating the variants, and the
machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

KV_HEADS, HEAD_DIM, GROUPS = 2, 256, 4
CALLS = 100


def attend(keys: jax.Array, values: jax.Array, q: jax.Array) -> jax.Array:
    """q [1, K, G, H] over keys/values [1, S, K, H] -> [1, K, G, H]."""
    logits = jnp.einsum('bkgh,bskh->bkgs', q, keys, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    return jnp.einsum('bkgs,bskh->bkgh', probs, values, preferred_element_type=jnp.float32)


def variants() -> dict:
    """name -> (function of (k_buf, v_buf, new, q, position), stored dtype, donates)."""
    def write_bf16(buf, new, at):
        return jax.vmap(lambda b, r, i: b.at[i].set(r, mode='drop'))(buf, new, at)

    def write_bits(buf, new, at):
        return write_bf16(buf, jax.lax.bitcast_convert_type(new, jnp.uint16), at)

    def write_select(buf, new, at):
        hit = jnp.arange(buf.shape[1])[None, :, None, None] == at[:, :, None, None]
        return jnp.where(hit, new, buf)

    def step(write, read):
        def run(k_buf, v_buf, new, q, at):
            k_buf, v_buf = write(k_buf, new, at), write(v_buf, new, at)
            return k_buf, v_buf, attend(read(k_buf), read(v_buf), q)
        return run

    bf16, bits = (lambda b: b), (lambda b: jax.lax.bitcast_convert_type(b, jnp.bfloat16))
    return {
        'bf16 write + attend': (step(write_bf16, bf16), jnp.bfloat16, True),
        'bits write + attend': (step(write_bits, bits), jnp.uint16, True),
        'select write + attend': (step(write_select, bf16), jnp.bfloat16, True),
        'select write': (lambda k, v, new, q, at: (write_select(k, new, at),
                                                   write_select(v, new, at)), jnp.bfloat16, True),
        'bf16 write': (lambda k, v, new, q, at: (write_bf16(k, new, at), write_bf16(v, new, at)),
                       jnp.bfloat16, True),
        'bits write': (lambda k, v, new, q, at: (write_bits(k, new, at), write_bits(v, new, at)),
                       jnp.uint16, True),
        'bf16 read': (lambda k, v, new, q, at: attend(k, v, q), jnp.bfloat16, False),
        'bits read': (lambda k, v, new, q, at: attend(bits(k), bits(v), q), jnp.uint16, False),
    }


def time_calls(fn, dtype, donates: bool, slots: int) -> float:
    """ms per call of `fn`, the buffers handed back each call when donated."""
    k_buf = jnp.zeros((1, slots, KV_HEADS, HEAD_DIM), dtype)
    v_buf = jnp.zeros_like(k_buf)
    new = jnp.ones((1, 1, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    q = jnp.ones((1, KV_HEADS, GROUPS, HEAD_DIM), jnp.bfloat16)
    at = jnp.array([[slots // 2]], jnp.int32)
    out = None
    for i in range(CALLS + 3):
        if i == 3:
            jax.block_until_ready(out)
            start = time.perf_counter()
        out = fn(k_buf, v_buf, new, q, at)
        if donates:
            k_buf, v_buf = out[0], out[1]
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / CALLS * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--slots', default='256,1024,4096')
    parser.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args()
    compiled = {name: (jax.jit(fn, donate_argnums=(0, 1) if donates else ()), dtype, donates)
                for name, (fn, dtype, donates) in variants().items()}
    print(f'load average at the start {os.getloadavg()[0]:.2f}')
    slots = [int(s) for s in args.slots.split(',')]
    rows = {}
    for s in slots:
        times = {name: [] for name in compiled}
        for _ in range(args.repeats):
            for name, (fn, dtype, donates) in compiled.items():
                times[name].append(time_calls(fn, dtype, donates, s))
        rows[s] = {name: statistics.median(t) for name, t in times.items()}
    print('| ms per call (median) | ' + ' | '.join(f'S = {s}' for s in slots) + ' |')
    print('| --- |' + ' --- |' * len(slots))
    for name in compiled:
        print(f'| {name} | ' + ' | '.join(f'{rows[s][name]:.3f}' for s in slots) + ' |')
    print(f'load average at the end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
    main()
