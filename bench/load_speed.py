"""Load time and time to first token: a converted checkpoint (`gemma3n convert`) against loading
the original one, with a cold and a warm compilation cache, bf16 / int8 / int4.

    python -m bench.load_speed --size reduced                 # all three representations
    python -m bench.load_speed --size reduced --representations int8 --rounds 2

The converted folders are written once under bench/results/converted/<size>-<representation>/
(from the bench's random checkpoint, `bench.common.ensure_weights`; delete them to convert again;
the conversion's own time is printed). Each measurement runs in a fresh process, as `gemma3n
generate` would: the compilation cache is the CLI's (`gemma3n.compilation`, notice included), a
new empty folder for the cold run, then the same folder again for the warm one. Reported: load s
(`gemma3n.load`, the per-layer table opened), time to first token s (a 128-token prompt: prefill
and the first token, compilation included), the compiles the persistent cache missed during load
and first token (and which programs), resident memory after load and peak. Both checkpoints'
files are read through the page cache (this shared machine's caches are not dropped): the files
were just written or read, so "load" here is the work of loading, not the disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, process_memory

REPRESENTATIONS = {'bf16': None, 'int8': 'int8', 'int4': 'int4'}
PROMPT_LENGTH = 128
CACHE_LENGTH = 1024             # as bench.side_ours


def converted_path(size: str, representation: str) -> Path:
    """Where the bench checkpoint converted to `representation` is kept."""
    return common.RESULTS_DIR / 'converted' / f'{size}-{representation}'


def converted_folder(size: str, representation: str, weights: Path) -> Path:
    """The converted folder of the bench checkpoint in `representation`, written if missing."""
    import jax.numpy as jnp

    import gemma3n
    from gemma3n.converted import save_converted
    from gemma3n.transformer import Gemma3nTransformer

    folder = converted_path(size, representation)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    model = Gemma3nTransformer(config=common.bench_config(size), text_only=True, dtype=jnp.bfloat16)
    start = time.perf_counter()
    with gemma3n.load(weights, model=model, quantize=REPRESENTATIONS[representation],
                      tokenizer=False, progress=False) as loaded:
        save_converted(folder, loaded)
    print(f'converted {representation} in {time.perf_counter() - start:.1f} s: {folder}', flush=True)
    return folder


class _Misses(logging.Filter):
    """The programs JAX's persistent cache missed (compiled anew), from its DEBUG log; a filter
    placed before `gemma3n.compilation`'s (which drops the DEBUG records it reads)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        from gemma3n.compilation import CACHE_MISS_MESSAGE
        if isinstance(record.msg, str) and record.msg.startswith(CACHE_MISS_MESSAGE):
            self.names.append(str(record.args[0]))
        return True


def child(checkpoint: Path, size: str, quantize: str | None, cache: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import jax
    import jax.numpy as jnp

    import gemma3n
    from gemma3n.compilation import JAX_COMPILER_LOGGER, compile_notice, use_compilation_cache
    from gemma3n.transformer import Gemma3nTransformer

    jax.config.update('jax_compilation_cache_dir', str(cache))
    use_compilation_cache(cache)
    misses = _Misses()
    logging.getLogger(JAX_COMPILER_LOGGER).filters.insert(0, misses)
    notices = []
    model = Gemma3nTransformer(config=common.bench_config(size), text_only=True, dtype=jnp.bfloat16)
    result: dict[str, Any] = {'rss_before_load_gb': process_memory.current_rss_bytes() / common.GB}
    with compile_notice(notices.append, 'compiling'):
        with common.Stopwatch() as watch:
            loaded = gemma3n.load(checkpoint, model=model, quantize=quantize, tokenizer=False,
                                  progress=False)
        result['load_s'] = watch.seconds
        result['load_misses'] = list(misses.names)
        result['rss_after_load_gb'] = process_memory.current_rss_bytes() / common.GB
        sampler = loaded.sampler(cache_length=CACHE_LENGTH, cache_dtype=jnp.bfloat16)
        prompt = common.prompt_tokens(PROMPT_LENGTH, model.config.num_embed)
        with common.Stopwatch() as watch:
            token = next(iter(sampler.generation(prompt, 1)))
            int(np.asarray(token)[0])
        result['ttft_s'] = watch.seconds
    result['first_token_misses'] = misses.names[len(result['load_misses']):]
    result['compile_notice_shown'] = bool(notices)
    result['peak_rss_gb'] = process_memory.peak_rss_since_reset_bytes() / common.GB     # VmHWM: this process's own (ru_maxrss keeps the parent's across exec)
    return result


def _measure(checkpoint: Path, size: str, representation: str, cache: Path) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix='.json') as out:
        subprocess.run([sys.executable, '-m', 'bench.load_speed', '--child', str(checkpoint),
                        '--size', size, '--representations', representation,
                        '--cache', str(cache), '--out', out.name], check=True, cwd=common.REPO_ROOT)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', choices=common.SIZES, default='reduced')
    parser.add_argument('--representations', default=','.join(REPRESENTATIONS),
                        help='comma-separated subset of ' + ', '.join(REPRESENTATIONS))
    parser.add_argument('--rounds', type=int, default=1, help='cold + warm pairs per case')
    parser.add_argument('--convert-only', action='store_true',
                        help='write the converted folders (if missing), measure nothing')
    parser.add_argument('--child', type=Path, help=argparse.SUPPRESS)
    parser.add_argument('--cache', type=Path, help=argparse.SUPPRESS)
    parser.add_argument('--out', type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    chosen = [r.strip() for r in args.representations.split(',') if r.strip()]
    if not chosen or set(chosen) - REPRESENTATIONS.keys():
        raise SystemExit(f'--representations must name some of {", ".join(REPRESENTATIONS)}')
    if args.child is not None:
        result = child(args.child, args.size, REPRESENTATIONS[chosen[0]], args.cache)
        args.out.write_text(json.dumps(result))
        return

    weights = common.ensure_weights(args.size)
    if args.convert_only:
        for representation in chosen:
            print(converted_folder(args.size, representation, weights))
        return
    rows, runs = [], []
    for representation in chosen:
        sources = {'original': weights,
                   'converted': converted_folder(args.size, representation, weights)}
        for _ in range(args.rounds):
            for source, checkpoint in sources.items():
                cache = Path(tempfile.mkdtemp(prefix='gemma3n-load-speed-'))
                try:
                    for state in ('cold', 'warm'):
                        load_before = common.machine_info()['load_average'][0]
                        result = _measure(checkpoint, args.size, representation, cache)
                        result.update(representation=representation, source=source, cache=state,
                                      load_average=load_before)
                        runs.append(result)
                        misses = result['load_misses'] + result['first_token_misses']
                        rows.append([representation, source, state, f'{load_before:.1f}',
                                     result['load_s'], result['ttft_s'], len(misses),
                                     'yes' if result['compile_notice_shown'] else 'no',
                                     result['rss_after_load_gb'], result['peak_rss_gb']])
                        print(rows[-1], flush=True)
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
    header = ['repr', 'checkpoint', 'compile cache', 'load avg', 'load s', 'first token s',
              'compiles', 'notice', 'RSS after load GB', 'peak RSS GB']
    table = common.format_table(header, rows)
    print(table)
    for run in runs:
        if run['cache'] == 'warm':
            print(f"{run['representation']} {run['source']} warm: programs compiled: "
                  f"{sorted(set(run['load_misses'] + run['first_token_misses']))}")
    out = common.write_json({'size': args.size, 'machine': common.machine_info(), 'runs': runs,
                             'table': table}, common.results_path(f'load-speed-{args.size}'))
    print(f'written to {out.relative_to(common.REPO_ROOT)}')


if __name__ == '__main__':
    main()
