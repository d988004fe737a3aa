"""The CPU benchmark: ours (JAX) against `transformers` (torch) on the same random weights.

    python -m bench.run --size reduced      # E4B widths, 10 layers (~2.4B params, 4.7 GB)
    python -m bench.run --size full         # E4B text model (6.9B params, 13.7 GB; needs ~20 GB free)
    python -m bench.run --size reduced --sides ours,ours-serving,ours-int8,hf
    python -m bench.run --size tiny --sides ours-serving,ours-int8,ours-int4,llamacpp-bf16,llamacpp-q8_0,llamacpp-q4_0
    python -m bench.run --size reduced --sides ours-int8,llamacpp-q8_0 --ours-weights bench/results/converted/reduced-int8
    # issue 18's table: converted checkpoints, warm caches, every format beside llama.cpp's
    python -m bench.run --size full --converted --compile-cache bench/results/jax-cache \
        --sides ours-serving,ours-int8,ours-int4,llamacpp-bf16,llamacpp-q8_0,llamacpp-q4_0

Each part runs in its own process, one after the other: the machine's bandwidth, each of our
variants (see bench/side_ours.py), the transformers side, llama.cpp at each GGUF format (see
bench/side_llamacpp.py; build it first: `python -m bench.llamacpp_build`); so each side's peak
resident memory is its own. Prints one table (ratios against transformers) and writes everything to
bench/results/<size>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, page_cache
from bench.llamacpp_gguf import ensure_gguf
from bench.load_speed import converted_path

THEIRS = 'hf'
SERVING, INT8, INT4 = 'ours-serving', 'ours-int8', 'ours-int4'
# llama.cpp's formats and the variant of ours each is set against.
LLAMACPP = {'llamacpp-bf16': SERVING, 'llamacpp-q8_0': INT8, 'llamacpp-q4_0': INT4}
LLAMACPP_BF16 = 'llamacpp-bf16'
LLAMACPP_FORMAT = {side: side.split('-')[1] for side in LLAMACPP}
CONVERTED = {SERVING: 'bf16', INT8: 'int8', INT4: 'int4'}   # --converted: side -> representation
SIDES = {  # name -> python arguments
    'ours': ['-m', 'bench.side_ours', '--variant', 'plain'],
    SERVING: ['-m', 'bench.side_ours', '--variant', 'serving'],
    INT8: ['-m', 'bench.side_ours', '--variant', 'int8'],
    INT4: ['-m', 'bench.side_ours', '--variant', 'int4'],
    THEIRS: ['-m', 'bench.side_hf'],
    **{side: ['-m', 'bench.side_llamacpp', '--format', fmt] for side, fmt in LLAMACPP_FORMAT.items()},
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
    ('at the end: private memory GB', 'rss_private_end_gb', False),
    ('at the end: mapped files\' pages GB', 'rss_file_end_gb', False),
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


def _first_logprobs(paths: dict[str, Any], results: dict[str, dict[str, Any]],
                    side: str) -> dict[int, float]:
    """{token id: log-probability} of the first generated token: all ids for a side that wrote
    its logits, the top ids llama.cpp's server returned for a llama.cpp side."""
    top = results[side].get('first_top_logprobs')
    if top:
        return dict(zip(top['ids'], top['logprobs']))
    logits = np.load(paths[side].with_suffix('.logits.npy')).astype(np.float64)
    shifted = logits - logits.max()
    return dict(enumerate(shifted - np.log(np.exp(shifted).sum())))


def compare_logprobs(paths: dict[str, Any], results: dict[str, dict[str, Any]], side: str,
                     reference: str) -> dict[str, Any]:
    """How closely `side` agrees with `reference` where one is llama.cpp, whose server gives
    log-probabilities, not logits: compared on the ids both have, centred (a log-probability is
    the logit less a constant, so centred log-probabilities over all ids are centred logits)."""
    ours, theirs = (_first_logprobs(paths, results, s) for s in (side, reference))
    ids = sorted(ours.keys() & theirs.keys())
    a, b = (np.array([values[i] for i in ids]) for values in (ours, theirs))
    a_centred, b_centred = a - a.mean(), b - b.mean()
    tokens = [results[s]['decode_tokens'] for s in (side, reference)]
    same = next((i for i, (x, y) in enumerate(zip(*tokens)) if x != y), min(map(len, tokens)))
    return {
        'first_logprobs_compared': len(ids),
        'first_logprobs_max_abs_diff': float(np.max(np.abs(a - b))),
        'first_logprobs_centred_rel_l2': float(np.linalg.norm(a_centred - b_centred) / np.linalg.norm(b_centred)),
        'first_token_equal': max(ours, key=ours.get) == max(theirs, key=theirs.get),
        'decode_tokens_equal_prefix': same,
        'decode_tokens_compared': min(map(len, tokens)),
    }


def report(size: str, machine: dict[str, Any], bandwidth: dict[str, Any],
           results: dict[str, dict[str, Any]], agreement: dict[str, dict[str, Any]]) -> str:
    # Ratio columns: every side against transformers, ours against llama.cpp at the same format.
    compared = [(side, THEIRS) for side in results if side != THEIRS and THEIRS in results]
    compared += [(ours, side) for side, ours in LLAMACPP.items() if side in results and ours in results]
    header = ['metric', *(results[side]['name'] for side in results),
              *(f'{side}/{reference}' for side, reference in compared)]
    rows = []
    for label, key, _ in ROWS:
        values = [results[side].get(key) for side in results]
        ratios = [common.ratio(results[side].get(key), results[reference].get(key))
                  for side, reference in compared]
        rows.append([label, *values, *ratios])
    read = bandwidth['read_gb_s']
    lines = [
        f'== {size}: {bandwidth["params"] / 1e9:.2f}B params, bfloat16; {machine["cpus"]} CPUs, '
        f'load average at start {machine["load_average"][0]:.2f}, at end {machine["load_average_end"][0]:.2f}',
        common.format_table(header, rows),
        '',
        f'memory read bandwidth: {read:.1f} GB/s (numpy 1 thread {bandwidth["numpy_1thread_gb_s"]:.1f}, '
        f'JAX all threads {bandwidth["jax_all_threads_gb_s"]:.1f}, numpy {bandwidth["threads"]} threads '
        f'{_spread(bandwidth, "threaded")}, our bf16 kernel {_spread(bandwidth, "kernel")})',
        f'weights read per decoded token: {bandwidth["decode_weights_read"]["total"] / 1e9:.3f}B '
        f'({bandwidth["decode_bytes_per_token_bf16"] / common.GB:.2f} GB in bfloat16) -> ceiling '
        f'{bandwidth["ceiling_tok_s_bf16"]:.2f} tok/s bf16, {bandwidth["ceiling_tok_s_int8"]:.2f} int8',
    ]
    settled = {side: result['page_cache'] for side, result in results.items() if result.get('page_cache')}
    lines.append('page cache: ' + (
        'before each side its model files were read in, the others dropped (bench/page_cache.py): '
        + ', '.join(f'{results[side]["name"]} {cache["read_in_gb"]:.1f} GB read in {cache["read_in_s"]:.0f} s'
                    for side, cache in settled.items())
        if settled else 'as the sides before each left it (--page-cache as-found)'))
    for side in results:
        share = results[side]['decode_tok_s'] / bandwidth['ceiling_tok_s_bf16']
        lines.append(f'  {results[side]["name"]} decodes at {100 * share:.0f}% of the bfloat16 ceiling')
    for pair, check in agreement.items():
        if 'first_logprobs_compared' in check:
            lines.append(
                f'{pair}, first-token log-probabilities of {check["first_logprobs_compared"]} ids: max |diff| '
                f'{check["first_logprobs_max_abs_diff"]:.3g} (centred, rel L2 {check["first_logprobs_centred_rel_l2"]:.3g}); '
                f'same first token: {check["first_token_equal"]}; greedy tokens equal for the first '
                f'{check["decode_tokens_equal_prefix"]} of {check["decode_tokens_compared"]}')
            continue
        lines.append(
            f'{pair}, first-token logits: max |diff| {check["first_logits_max_abs_diff"]:.3g} '
            f'(max |logit| {check["first_logits_max_abs"]:.3g}, rel L2 {check["first_logits_rel_l2"]:.3g}); '
            f'greedy tokens equal for the first {check["decode_tokens_equal_prefix"]} of '
            f'{check["decode_tokens_compared"]}')
    return '\n'.join(lines)


def _spread(bandwidth: dict[str, Any], name: str) -> str:
    """'best (median, worst)' GB/s of one of bench.machine's repeated measurements."""
    if f'{name}_gb_s' not in bandwidth:
        return 'not measured'
    return (f'{bandwidth[f"{name}_gb_s"]:.1f} (median {bandwidth[f"{name}_median_gb_s"]:.1f}, '
            f'worst {bandwidth[f"{name}_worst_gb_s"]:.1f})')


def converted(size: str, representation: str) -> Path:
    """The bench checkpoint converted to `representation`, written first if missing (in its own
    process, as the sides run in theirs)."""
    common.run_python(['-m', 'bench.load_speed', '--size', size, '--representations',
                       representation, '--convert-only'])
    return converted_path(size, representation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', choices=common.SIZES, default='reduced')
    parser.add_argument('--sides', default=DEFAULT_SIDES, help='comma-separated subset of: ' + ', '.join(SIDES))
    parser.add_argument('--decode-tokens', type=int, default=16, help='timed decode steps per side')
    parser.add_argument('--repeats', type=int, default=2, help='prefill timings take the best of these')
    parser.add_argument('--force', action='store_true', help='run even when little memory is available')
    parser.add_argument('--ours-weights', type=Path, metavar='DIR',
                        help='the checkpoint our sides load instead of the bench\'s random one: a folder '
                             '`gemma3n convert` wrote from it (bench.load_speed writes them under '
                             'bench/results/converted/), in the representation of the one ours-* side run '
                             '(ours-int8: an --int8 folder)')
    parser.add_argument('--converted', action='store_true',
                        help='our serving, int8 and int4 sides each load the checkpoint converted to '
                             'their representation (`gemma3n convert`; written under '
                             'bench/results/converted/ first if missing)')
    parser.add_argument('--compile-cache', type=Path, metavar='DIR',
                        help='our sides keep compiled and traced programs in DIR, as `gemma3n` commands '
                             'do, and each first runs once untimed: load and first token are then '
                             'measured with a warm cache')
    parser.add_argument('--page-cache', choices=('settled', 'as-found'), default='settled',
                        help='settled (default): before each side, its model files are read into the '
                             'page cache and the other sides\' dropped (bench/page_cache.py); as-found: '
                             'left as the sides before it leave them')
    args = parser.parse_args()
    if args.converted and args.ours_weights:
        raise SystemExit('--converted and --ours-weights both choose our checkpoints: give one.')
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
        checkpoint = weights
        if args.ours_weights and side.startswith('ours'):
            checkpoint = args.ours_weights
        elif args.converted and side in CONVERTED:
            checkpoint = converted(args.size, CONVERTED[side])
        command = [*SIDES[side], '--size', args.size, '--weights', str(checkpoint)]
        env = None
        if args.compile_cache and side.startswith('ours'):
            env = {common.COMPILATION_CACHE_ENV: str(args.compile_cache.resolve())}
            print(f'warming the compilation cache for {side} ...', flush=True)
            common.run_python([*command, '--out', str(paths[side]), '--decode-tokens', '2',
                               '--repeats', '1'], env=env)
        own = [ensure_gguf(args.size, (LLAMACPP_FORMAT[side],))[LLAMACPP_FORMAT[side]]
               if side in LLAMACPP else checkpoint]
        cache = page_cache.settle(own) if args.page_cache == 'settled' else None
        print(f'running {side} ...', flush=True)
        common.run_python([*command, '--out', str(paths[side]), '--decode-tokens',
                           str(args.decode_tokens), '--repeats', str(args.repeats)], env=env)
        results[side] = {**json.loads(paths[side].read_text()), 'page_cache': cache}
    machine['load_average_end'] = common.machine_info()['load_average']
    pairs = [(side, THEIRS) for side in results if side != THEIRS and THEIRS in results]
    for quantized in (INT8, INT4):
        if quantized in results and SERVING in results:
            pairs.append((quantized, SERVING))   # the quantization error against the same code in bfloat16
    for side, ours in LLAMACPP.items():
        if side in results and ours in results:
            pairs.append((side, ours))
        if side != LLAMACPP_BF16 and side in results and LLAMACPP_BF16 in results:
            pairs.append((side, LLAMACPP_BF16))  # llama.cpp's own quantization error
    agreement = {f'{side} vs {reference}': (compare_logprobs if side in LLAMACPP else compare_outputs)(
                     paths, results, side, reference)
                 for side, reference in pairs}
    text = report(args.size, machine, bandwidth, results, agreement)
    print(text)
    out = common.write_json({'size': args.size, 'machine': machine, 'bandwidth': bandwidth,
                             'results': results, 'agreement': agreement, 'table': text},
                            common.results_path(args.size))
    print(f'written to {out.relative_to(common.REPO_ROOT)}')


if __name__ == '__main__':
    main()
