"""The CPU benchmark: ours (JAX) against `transformers` (torch) on the same random weights.

    python -m bench.run --size reduced      # E4B widths, 10 layers (~2.4B params, 4.7 GB)
    python -m bench.run --size full         # E4B text model (6.9B params, 13.7 GB; needs ~20 GB free)
    python -m bench.run --size reduced --sides ours,ours-serving,ours-int8,hf

Each part runs in its own process, one after the other: the machine's bandwidth, each of our
variants (see bench/side_ours.py), the transformers side; so each side's peak resident memory is
its own. Prints one table (ratios against transformers) and writes everything to
bench/results/<size>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from bench import common

THEIRS = 'hf'
SERVING, INT8 = 'ours-serving', 'ours-int8'
SIDES = {  # name -> python arguments
    'ours': ['-m', 'bench.side_ours', '--variant', 'plain'],
    SERVING: ['-m', 'bench.side_ours', '--variant', 'serving'],
    INT8: ['-m', 'bench.side_ours', '--variant', 'int8'],
    THEIRS: ['-m', 'bench.side_hf'],
}
DEFAULT_SIDES = 'ours,ours-serving,hf'
# The full size holds the model plus its largest tensor (the per-layer table) while loading.
MIN_AVAILABLE_GB = {'tiny': 1.0, 'reduced': 8.0, 'full': 20.0}

ROWS = (  # (label, key, higher is better)
    ('load s', 'load_s', False),
    ('time to first token s (128-token prompt, compile incl.)', 'ttft_s', False),
    ('prefill tok/s, 128-token prompt', 'prefill128_tok_s', True),
    ('prefill tok/s, 512-token prompt', 'prefill512_tok_s', True),
    ('first 512-token prefill s (compile incl.)', 'prefill512_first_call_s', False),
    ('decode tok/s', 'decode_tok_s', True),
    ('first decode step s (compile incl.)', 'decode_first_step_s', False),
    ('peak resident memory GB', 'peak_rss_gb', False),
    ('resident memory after load GB', 'rss_after_load_gb', False),
)


def compare_outputs(paths: dict[str, Any], results: dict[str, dict[str, Any]], side: str,
                    reference: str) -> dict[str, Any]:
    """How closely `side` agrees with `reference`: same weights, so the same logits up to
    bfloat16 rounding (int8 adds its quantization error)."""
    ours, theirs = (np.load(paths[s].with_suffix('.logits.npy')) for s in (side, reference))
    tokens = [results[s]['decode_tokens'] for s in (side, reference)]
    same = next((i for i, (a, b) in enumerate(zip(*tokens)) if a != b), len(tokens[0]))
    return {
        'first_logits_max_abs_diff': float(np.max(np.abs(ours - theirs))),
        'first_logits_rel_l2': float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)),
        'first_logits_max_abs': float(np.max(np.abs(theirs))),
        'first_token_equal': int(np.argmax(ours)) == int(np.argmax(theirs)),
        'decode_tokens_equal_prefix': same,
        'decode_tokens_compared': len(tokens[0]),
    }


def report(size: str, machine: dict[str, Any], bandwidth: dict[str, Any],
           results: dict[str, dict[str, Any]], agreement: dict[str, dict[str, Any]]) -> str:
    ours = [side for side in results if side != THEIRS]
    compared = ours if THEIRS in results else []
    header = ['metric', *(results[side]['name'] for side in results),
              *(f'{side}/hf' for side in compared)]
    rows = []
    for label, key, _ in ROWS:
        values = [results[side].get(key) for side in results]
        ratios = [common.ratio(results[side].get(key), results[THEIRS].get(key)) for side in compared]
        rows.append([label, *values, *ratios])
    read = bandwidth['read_gb_s']
    lines = [
        f'== {size}: {bandwidth["params"] / 1e9:.2f}B params, bfloat16; {machine["cpus"]} CPUs, '
        f'load average at start {machine["load_average"][0]:.2f}, at end {machine["load_average_end"][0]:.2f}',
        common.format_table(header, rows),
        '',
        f'memory read bandwidth: {read:.1f} GB/s (numpy 1 thread {bandwidth["numpy_1thread_gb_s"]:.1f}, '
        f'JAX all threads {bandwidth["jax_all_threads_gb_s"]:.1f})',
        f'weights read per decoded token: {bandwidth["decode_weights_read"]["total"] / 1e9:.3f}B '
        f'({bandwidth["decode_bytes_per_token_bf16"] / common.GB:.2f} GB in bfloat16) -> ceiling '
        f'{bandwidth["ceiling_tok_s_bf16"]:.2f} tok/s bf16, {bandwidth["ceiling_tok_s_int8"]:.2f} int8',
    ]
    for side in results:
        share = results[side]['decode_tok_s'] / bandwidth['ceiling_tok_s_bf16']
        lines.append(f'  {results[side]["name"]} decodes at {100 * share:.0f}% of the bfloat16 ceiling')
    for pair, check in agreement.items():
        lines.append(
            f'{pair}, first-token logits: max |diff| {check["first_logits_max_abs_diff"]:.3g} '
            f'(max |logit| {check["first_logits_max_abs"]:.3g}, rel L2 {check["first_logits_rel_l2"]:.3g}); '
            f'greedy tokens equal for the first {check["decode_tokens_equal_prefix"]} of '
            f'{check["decode_tokens_compared"]}')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', choices=common.SIZES, default='reduced')
    parser.add_argument('--sides', default=DEFAULT_SIDES, help='comma-separated subset of: ' + ', '.join(SIDES))
    parser.add_argument('--decode-tokens', type=int, default=16, help='timed decode steps per side')
    parser.add_argument('--repeats', type=int, default=2, help='prefill timings take the best of these')
    parser.add_argument('--force', action='store_true', help='run even when little memory is available')
    args = parser.parse_args()
    sides = [s.strip() for s in args.sides.split(',') if s.strip()]
    unknown = sorted(set(sides) - SIDES.keys())
    if unknown or not sides:
        raise ValueError(f'--sides must name some of {sorted(SIDES)}, got {args.sides!r}.')

    machine = common.machine_info()
    if machine['memory_available_gb'] < MIN_AVAILABLE_GB[args.size] and not args.force:
        raise SystemExit(f'Only {machine["memory_available_gb"]:.1f} GB of memory available; the {args.size} '
                         f'benchmark needs about {MIN_AVAILABLE_GB[args.size]:.0f} GB (--force to try anyway).')
    weights = common.ensure_weights(args.size)
    scratch = common.RESULTS_DIR / 'scratch'
    paths = {'machine': scratch / f'{args.size}-machine.json',
             **{side: scratch / f'{args.size}-{side}.json' for side in sides}}
    common.run_python(['-m', 'bench.machine', '--size', args.size, '--out', str(paths['machine'])])
    bandwidth = json.loads(paths['machine'].read_text())
    results = {}
    for side in sides:
        print(f'running {side} ...', flush=True)
        common.run_python([*SIDES[side], '--size', args.size, '--weights', str(weights),
                           '--out', str(paths[side]), '--decode-tokens', str(args.decode_tokens),
                           '--repeats', str(args.repeats)])
        results[side] = json.loads(paths[side].read_text())
    machine['load_average_end'] = common.machine_info()['load_average']
    pairs = [(side, THEIRS) for side in results if side != THEIRS and THEIRS in results]
    if INT8 in results and SERVING in results:
        pairs.append((INT8, SERVING))     # the int8 error against the same code in bfloat16
    agreement = {f'{side} vs {reference}': compare_outputs(paths, results, side, reference)
                 for side, reference in pairs}
    text = report(args.size, machine, bandwidth, results, agreement)
    print(text)
    out = common.write_json({'size': args.size, 'machine': machine, 'bandwidth': bandwidth,
                             'results': results, 'agreement': agreement, 'table': text},
                            common.results_path(args.size))
    print(f'written to {out.relative_to(common.REPO_ROOT)}')


if __name__ == '__main__':
    main()
