"""Peak memory of a long prompt through chunked prefill: it stays weights + cache + one chunk.

    python -m bench.prefill_memory --size demo --length 32768      # the command's demo model
    python -m bench.prefill_memory --size reduced --length 8192    # E4B widths, 10 layers, bf16

Random weights are made in memory. For a short and a long prompt (the long one fills the cache),
the process's peak resident memory (VmHWM, reset before each run) is printed next to the weights,
the cache and the estimate of `gemma3n.memory`, with the number of compiled prefill programs.
CPU-heavy at the reduced size (minutes): run it alone.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, process_memory
from gemma3n import memory
from gemma3n.models import demo_config
from gemma3n.text import special_tokens
from gemma3n.engine.prefill import DEFAULT_PREFILL_CHUNK
from gemma3n.text.sampler import Sampler
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
from gemma3n.transformer import Gemma3nTransformer

SHORT_PROMPT = 1024
NEW_TOKENS = 4
DTYPES = {'demo': jnp.float32, 'reduced': jnp.bfloat16}   # as the command runs each
WEIGHT_SCALE = 0.02         # any finite weights do: only memory is measured


def build(size: str) -> tuple[Gemma3nTransformer, dict]:
    """The model and random weights in the dtype the command runs it in."""
    config = (demo_config(Tokenizer(default_tokenizer_path()).vocab_size) if size == 'demo'
              else common.bench_config(size))
    model = Gemma3nTransformer(config=config, text_only=True, dtype=DTYPES[size])
    return model, common.leafwise_random_params(model, model.dtype, WEIGHT_SCALE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', choices=tuple(DTYPES), required=True)
    parser.add_argument('--length', type=int, required=True, help='cache length = longest prompt')
    parser.add_argument('--chunk', type=int, default=DEFAULT_PREFILL_CHUNK)
    args = parser.parse_args()
    model, params = build(args.size)
    print(f'weights made: resident {process_memory.current_rss_bytes() / common.GB:.2f} GB, peak so far '
          f'{process_memory.peak_rss_since_reset_bytes() / common.GB:.2f} GB', flush=True)
    dtype = DTYPES[args.size]
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    cache = memory.cache_bytes(model.config, 1, dtype, args.length)
    estimate = memory.prefill_chunk_bytes(model.config, 1, args.chunk, args.length, dtype)
    sampler = Sampler(model=model, params=params, cache_length=args.length, cache_dtype=dtype,
                      prefill_chunk=args.chunk)
    rng = np.random.default_rng(common.PROMPT_SEED)
    rows = []
    for length in (SHORT_PROMPT, args.length - NEW_TOKENS):
        prompt = [special_tokens.BOS] + rng.integers(3, model.config.num_embed,
                                                     length - 1).tolist()
        process_memory.reset_peak_rss()
        base = process_memory.peak_rss_since_reset_bytes()
        start = time.perf_counter()
        out = sampler.sample_tokens([prompt], NEW_TOKENS)
        jax.block_until_ready(out.state.cache)
        seconds = time.perf_counter() - start
        rows.append([length, -(-length // args.chunk), round(seconds, 1), base / common.GB,
                     process_memory.peak_rss_since_reset_bytes() / common.GB,
                     (process_memory.peak_rss_since_reset_bytes() - base) / common.GB])
    print(f'{args.size}: weights {weights / common.GB:.3f} GB ({dtype.__name__}), cache of '
          f'{args.length} positions {cache / common.GB:.3f} GB, estimated chunk activations '
          f'{estimate / common.GB:.3f} GB (chunk {args.chunk}); compiled prefill programs: '
          f'{sampler.num_traces["prefill"]}')
    print(common.format_table(
        ['prompt tokens', 'chunks', 's (compile incl.)', 'RSS before GB', 'peak RSS GB',
         'peak - before GB'], rows))


if __name__ == '__main__':
    main()
