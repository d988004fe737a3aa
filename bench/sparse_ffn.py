"""One sparse layer's FFN at E4B widths (D 2048, F 16384, sparsity 0.95): decode (one token)
with the dense product against the sparse rows (`gemma3n.sparse_rows`), at bf16, int8 and int4,
with our decode kernels and with XLA's products; the int4 prefill (128 tokens); and, in bf16,
many tokens (a prefill chunk; with the backward in x, a LoRA step's frozen FFN): the dense
products against each token's own kept rows on the masked-rows kernels
(`gemma3n.layers.masked_rows`).

Random weights (fan-in scaled normal) and a random input, so the gaussian top-k keeps ~5% of
the units as it assumes. Each figure is the best of `--repeats` calls; the load average is
printed with them (a shared machine slows every row alike only roughly).

    python -m bench.sparse_ffn [--repeats 10] [--prefill 128] [--tokens 128,512,2048]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.config import TransformerConfig
from gemma3n.ffn import FeedForward
from gemma3n.layers import decode_kernels
from gemma3n.layout import ServingConverter
from gemma3n.transformer import Gemma3nTransformer

# One sparse layer is all the converter needs to know about (layer_0's FFN).
CONFIG = TransformerConfig.gemma3n(num_layers=5, num_shared_layers=0, num_sparse_layers=1,
                                   num_embed=256)
PATHS = ('layer_0/mlp/gating_einsum', 'layer_0/mlp/linear')
FORMATS = {'bf16': {}, 'int8': {'quantize_int8': True}, 'int4': {'quantize_int4': True}}


def best_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def many_tokens(ffn: FeedForward, layouts: dict, counts: list[int], rng: np.random.Generator,
                repeats: int) -> None:
    """Prints the bf16 FFN of each count of tokens, forward and forward + backward in x, in the
    serving layout (dense products) and the sparse rows layout (the masked-rows kernels)."""
    os.environ[decode_kernels.ENV] = 'auto'
    for count in counts:
        x = jnp.asarray(rng.standard_normal((1, count, ffn.features)), jnp.bfloat16)
        weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
        figures = []
        for rows in (False, True):
            def forward(p, x):
                return ffn.apply({'params': p}, x)

            def loss(p, x):
                return jnp.sum(forward(p, x).astype(jnp.float32) * weights)

            fwd, bwd = jax.jit(forward), jax.jit(jax.grad(loss, argnums=1))
            figures.append([best_ms(fn, layouts[rows], x, repeats=max(2, repeats // 3))
                            for fn in (fwd, bwd)])
        (dense_f, dense_b), (rows_f, rows_b) = figures
        print(f'bf16 {count} tokens: forward dense {dense_f:.1f} ms, kept rows {rows_f:.1f} ms '
              f'({dense_f / rows_f:.1f}x); forward + backward in x dense {dense_b:.1f} ms, kept '
              f'rows {rows_b:.1f} ms ({dense_b / rows_b:.1f}x)', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--prefill', type=int, default=128)
    parser.add_argument('--kernels', default='auto,off', help="$GEMMA3N_KERNELS values to time")
    parser.add_argument('--formats', default=','.join(FORMATS))
    parser.add_argument('--tokens', default='128,512,2048',
                        help='bf16 token counts timed dense against the masked-rows kernels')
    args = parser.parse_args()
    model = Gemma3nTransformer(config=CONFIG, text_only=True, dtype=jnp.bfloat16)
    d, f = CONFIG.embed_dim, CONFIG.hidden_dim
    rng = np.random.default_rng(0)
    weights = {PATHS[0]: (rng.standard_normal((2, f, d), np.float32) / np.sqrt(d)),
               PATHS[1]: (rng.standard_normal((f, d), np.float32) / np.sqrt(f))}
    weights = {p: w.astype(jnp.bfloat16) for p, w in weights.items()}
    ffn = FeedForward(features=d, hidden_dim=f, transpose_gating_einsum=True,
                      sparsity=CONFIG.sparsity(0), dtype=jnp.bfloat16)
    token = jnp.asarray(rng.standard_normal((1, 1, d)), jnp.bfloat16)
    prompt = jnp.asarray(rng.standard_normal((1, args.prefill, d)), jnp.bfloat16)
    print(f'load average before: {os.getloadavg()}')
    for fmt in args.formats.split(','):
        options = FORMATS[fmt]
        layouts = {}
        for rows in (False, True):
            convert = ServingConverter(model, sparse_rows=rows, **options)
            layouts[rows] = {p.split('/')[-1]: convert(p, w) for p, w in weights.items()}
        for kernels in args.kernels.split(','):
            os.environ[decode_kernels.ENV] = kernels       # read when each function is traced
            figures = {}
            for rows, params in layouts.items():
                apply = jax.jit(lambda p, x: ffn.apply({'params': p}, x))
                figures['rows' if rows else 'dense'] = best_ms(apply, params, token,
                                                               repeats=args.repeats)
            print(f'{fmt} kernels={kernels}: decode 1 token dense {figures["dense"]:.2f} ms, '
                  f'sparse rows {figures["rows"]:.2f} ms '
                  f'({figures["dense"] / figures["rows"]:.1f}x)', flush=True)
        if fmt == 'int4':       # the kernels take at most 8 rows: a prefill is XLA's
            for rows, params in layouts.items():
                apply = jax.jit(lambda p, x: ffn.apply({'params': p}, x))
                ms = best_ms(apply, params, prompt, repeats=max(2, args.repeats // 3))
                print(f'int4 prefill {args.prefill} tokens, {"rows" if rows else "dense"} '
                      f'layout: {ms:.1f} ms', flush=True)
        if fmt == 'bf16':
            many_tokens(ffn, layouts, [int(t) for t in args.tokens.split(',')], rng, args.repeats)
        del layouts
    print(f'load average after: {os.getloadavg()}')


if __name__ == '__main__':
    main()
