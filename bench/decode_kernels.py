"""Decode speed with and without our CPU decode kernels, at bf16, int8 and int4, in one run;
the accuracy of int8 and int4 against bf16 on the same weights; the bandwidth ceiling.

The bench's random checkpoint at `--size` (`common.ensure_weights`), loaded per format by
our bench side (`bench.side_ours.build`: serving layout, converted while loading, the
per-layer table read lazily), so memory holds one model at a time. Per format, the kernels and XLA's products are timed one
after the other (`$GEMMA3N_KERNELS` switched between the two compiled samplers), so the load of
a shared machine hits both alike; the load average is printed with the figures.

    python -m bench.decode_kernels --size reduced [--decode-tokens 16] [--agree-tokens 64]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, machine
from bench.side_ours import CACHE_LENGTH, OursRunner, build
from gemma3n.layers import decode_kernels
from gemma3n.text.sampler import Sampler

# Our formats and the bench side's variant loading each.
FORMATS = {'bf16': 'serving', 'int8': 'int8', 'int4': 'int4'}
# Bytes read per weight value: int8 and int4 add their scales (per row / per 32 values).
BYTES_PER_VALUE = {'bf16': 2.0, 'int8': 1.0, 'int4': 0.5 + 2 / 32}
PROMPT_LENGTH = 8


def decode_rate(sampler: Sampler, prompt: np.ndarray, tokens: int) -> dict[str, float]:
    """Steady-state decode: tok/s over `tokens` steps after a warm-up step, and the fastest
    step's rate (the least disturbed by other load)."""
    runner = OursRunner(sampler)
    runner.start(prompt, tokens + 2)
    runner.step()
    steps = []
    for _ in range(tokens):
        with common.Stopwatch() as watch:
            runner.step()
        steps.append(watch.seconds)
    return {'tok_s': tokens / sum(steps), 'best_step_tok_s': 1 / min(steps)}


def greedy(sampler: Sampler, prompt: np.ndarray, tokens: int) -> tuple[np.ndarray, list[int]]:
    """First-token logits [V] and `tokens` greedy tokens."""
    runner = OursRunner(sampler)
    logits, first = runner.start(prompt, tokens)
    return logits, [first] + [runner.step() for _ in range(tokens - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--size', choices=common.SIZES, default='reduced')
    parser.add_argument('--decode-tokens', type=int, default=16)
    parser.add_argument('--agree-tokens', type=int, default=64)
    parser.add_argument('--out', type=Path, default=common.results_path('decode_kernels.json'))
    args = parser.parse_args()

    config = common.bench_config(args.size)
    info = common.machine_info()
    bandwidth = machine.threaded_read_bandwidth(np.ones(machine.ARRAY_BYTES // 4, np.float32))
    values_read = common.decode_weights_read(config)['total']
    weights = common.ensure_weights(args.size)
    prompt = common.prompt_tokens(PROMPT_LENGTH, config.num_embed)
    kernels_isa = decode_kernels.active_isa()

    results: dict[str, dict] = {}
    for fmt, variant in FORMATS.items():
        loaded, _ = build(weights, args.size, variant)
        row = {}
        for switch in ('auto', 'off'):
            os.environ[decode_kernels.ENV] = switch
            # A sampler of its own: the switch is read when its steps are compiled.
            sampler = Sampler(
                model=loaded.sampler.model, params=loaded.sampler.params,
                cache_length=CACHE_LENGTH, cache_dtype=jnp.bfloat16,
                per_layer_table=loaded.sampler.host_table)
            row['kernels' if switch == 'auto' else 'xla'] = decode_rate(
                sampler, prompt, args.decode_tokens)
            if switch == 'auto':
                row['first_logits'], row['tokens'] = greedy(sampler, prompt, args.agree_tokens)
        os.environ.pop(decode_kernels.ENV)
        row['load_average'] = os.getloadavg()
        row['ceiling_tok_s'] = bandwidth['threaded_gb_s'] * common.GB / (
            values_read * BYTES_PER_VALUE[fmt])
        results[fmt] = row
        del loaded, sampler

    base = results['bf16']
    lines = [f'decode at size {args.size}, kernels: {kernels_isa}, '
             f'{info["cpus"]} cpus, load average at start {info["load_average"][0]:.2f}',
             f'read bandwidth, {bandwidth["threads"]} threads: best {bandwidth["threaded_gb_s"]:.1f} '
             f'GB/s (median {bandwidth["threaded_median_gb_s"]:.1f}, worst '
             f'{bandwidth["threaded_worst_gb_s"]:.1f})']
    table = []
    for fmt, row in results.items():
        rel = np.linalg.norm(row['first_logits'] - base['first_logits']) / np.linalg.norm(
            base['first_logits'])
        agree = np.mean(np.array(row['tokens']) == np.array(base['tokens']))
        row.update(first_logits_rel_l2=float(rel), greedy_agreement=float(agree))
        table.append([fmt, f'{row["kernels"]["tok_s"]:.2f}', f'{row["xla"]["tok_s"]:.2f}',
                      f'{row["kernels"]["tok_s"] / row["xla"]["tok_s"]:.2f}x',
                      f'{row["kernels"]["best_step_tok_s"]:.2f}', f'{row["ceiling_tok_s"]:.2f}',
                      f'{row["kernels"]["best_step_tok_s"] / row["ceiling_tok_s"]:.0%}',
                      f'{rel:.4f}', f'{agree:.0%}', f'{row["load_average"][0]:.1f}'])
    for row in results.values():
        row.pop('first_logits')
    lines.append(common.format_table(
        ['format', 'kernels tok/s', 'XLA tok/s', 'speed-up', 'best step tok/s', 'ceiling',
         'best/ceiling', 'logits rel L2 vs bf16', f'greedy agree ({args.agree_tokens})',
         'load'], table))
    print('\n'.join(lines))
    common.write_json({'machine': info, 'bandwidth': bandwidth, 'kernels': kernels_isa,
                       'size': args.size, 'formats': results}, args.out)


if __name__ == '__main__':
    main()
