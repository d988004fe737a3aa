"""What one decode step of the server's batch costs by the number of rows it computes.

The server keeps its running requests in the lowest slots of a `--max-batch`-slot KV cache and
steps only the first R rows (R the power of two covering them, `Batch(occupied_only=True)`).
This times, on the bench's random weights (bfloat16, the serving layout, the per-layer table
read from the file, as `gemma3n serve` holds them):

- a step over R = 1, 2, 4, ... rows of a `--slots`-slot cache, every computed row decoding;
- a step of a cache of exactly R slots: the same rows without the rest of the cache beside them
  (equal times mean the unused rows are neither computed nor copied);
- moving one slot's sequence into another (`Batch.move`, what fills a hole left below running
  requests), to set against the extra rows a hole costs every step.

    python -m bench.step_rows --size reduced                      # E4B widths, 10 layers
    python -m bench.step_rows --size reduced --cache-length 4096  # a larger cache to copy

Writes bench/results/step-rows-<size>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bench import common

PROMPT_LENGTH = 32
REPEATS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', choices=('tiny', 'reduced', 'full'), default='reduced')
    parser.add_argument('--slots', type=int, default=16)
    parser.add_argument('--cache-length', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=REPEATS,
                        help='timed steps per row count (the median is printed)')
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import gemma3n
    from gemma3n.engine.batch import Batch
    from gemma3n.engine.engine import Engine
    from gemma3n.engine.sampling import Greedy
    from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path

    machine = common.machine_info()
    # The bench's weights come without a tokenizer; this bench feeds token ids only.
    loaded = gemma3n.load(common.ensure_weights(args.size), dtype=jnp.bfloat16, progress=False,
                          tokenizer=Tokenizer(default_tokenizer_path()))
    engine = Engine(loaded.model, loaded.params, per_layer_table=loaded.per_layer_table,
                    cache_dtype=jnp.bfloat16)
    key = jax.random.key(0)
    prompt = common.prompt_tokens(PROMPT_LENGTH, loaded.config.num_embed)[0]

    def filled(slots: int, active: int) -> Batch:
        batch = Batch(engine, engine.new_cache(slots, args.cache_length), occupied_only=True)
        for slot in range(active):
            batch.admit(slot, prompt, key, Greedy())
        return batch

    def step_ms(batch: Batch) -> float:
        def step():
            jax.block_until_ready(batch.step(key, Greedy()))
        step()                                                  # compiles this row count
        return common.median_of(step, args.repeats) * 1e3

    counts = [1 << k for k in range(args.slots.bit_length()) if 1 << k <= args.slots]
    rows = []
    for count in counts:
        rows.append([count, step_ms(filled(args.slots, count)), step_ms(filled(count, count))])
    batch = filled(args.slots, 2)

    def move():
        batch.move(1, 0)
        jax.block_until_ready(batch.cache)
        batch.move(0, 1)
        jax.block_until_ready(batch.cache)
    batch.free(0)
    move()
    move_ms = common.median_of(move, args.repeats) * 1e3 / 2

    table = common.format_table(
        ['rows computed', f'step of a {args.slots}-slot cache ms', 'step of a cache of those rows ms'],
        rows)
    load = os.getloadavg()
    print(f'{args.size}, cache length {args.cache_length}, {os.cpu_count()} CPUs, '
          f'load {machine["load_average"][0]:.1f} at the start, {load[0]:.1f} at the end')
    print(table)
    print(f'moving one slot\'s sequence into another: {move_ms:.3g} ms')
    path = common.write_json({'machine': machine, 'end_load_average': load, 'args': vars(args),
                              'rows': rows, 'move_ms': move_ms, 'table': table},
                             common.results_path(f'step-rows-{args.size}'))
    print(f'written: {path}')


if __name__ == '__main__':
    main()
