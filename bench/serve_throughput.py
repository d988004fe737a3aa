"""Server throughput: aggregate decode tokens/s at 1, 2, 4, 8, 16 concurrent streams.

Starts `gemma3n serve`'s server in this process (random bfloat16 weights of the bench size, the
serving layout, the packaged tokenizer) on loopback, then for each concurrency N sends N
streaming completions at once (distinct prompts, greedy, `--max-tokens` each) with the official
`openai` client and measures, per N: aggregate tokens/s (all completion tokens over the wall time
from the first request to the last answer's end), time to first token and inter-token gaps
(percentiles over every request and gap). The server's batch has max(N) slots.

Random weights emit any of the model's 262144 ids, most of which the small packaged tokenizer
cannot decode, and stop tokens at random: those ids are forbidden, so every answer runs its
`--max-tokens` (the masking costs one scatter per step).

    python -m bench.serve_throughput --size demo                  # the demo model: a smoke test
    python -m bench.serve_throughput --size reduced               # E4B widths, 10 layers
    python -m bench.serve_throughput --size full --int8           # the E4B text model in int8
    python -m bench.serve_throughput --size full --llamacpp q8_0  # llama.cpp's server, same weights

`--llamacpp FORMAT` measures llama.cpp's `llama-server` instead (`--parallel` max(N) slots,
continuous batching, its OpenAI endpoint) on the GGUF of the same random weights
(bench/llamacpp_gguf.py; build it first: `python -m bench.llamacpp_build`). Each prompt is sent
as the token ids our server prefills for its text (BOS included), so both prefill the same
tokens; `ignore_eos` keeps it from stopping early, as the forbidden ids do ours. The tiny size
(1024 ids: the ids wrap) is its smoke test.

Writes bench/results/serve-<size>[-<variant>]-<UTC time>.json and a .png plot beside it.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bench import common

STREAMS = (1, 2, 4, 8, 16)
PROMPT_WORDS = 24                   # each prompt: a distinct run of words, ~30 tokens
PERCENTILES = (50, 90, 99)
START_TIMEOUT_S = 600
WARMUP_TOKENS = 4
WARMUP_PROMPT = 10 ** 6         # prompt indices from here on: none a measured stream uses
CACHE_LENGTH = 256              # positions per slot


def build_service(size: str, int8: bool, slots: int, cache_length: int, max_tokens: int) -> Any:
    import jax.numpy as jnp
    import gemma3n
    from gemma3n.engine.engine import Engine
    from gemma3n.serving.app import Service
    from gemma3n.text import special_tokens
    from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path

    tokenizer = Tokenizer(default_tokenizer_path())
    loaded = gemma3n.load(None if size == 'demo' else common.ensure_weights(size),
                          dtype=jnp.bfloat16, quantize='int8' if int8 else None,
                          tokenizer=tokenizer, progress=False)
    forbidden = (special_tokens.EOS, special_tokens.END_OF_TURN,
                 *range(tokenizer.vocab_size, loaded.config.num_embed))
    engine = Engine(loaded.model, loaded.params, per_layer_table=loaded.per_layer_table,
                    forbidden_tokens=forbidden, cache_dtype=jnp.bfloat16)
    return Service(engine, tokenizer, model_name=size, slots=slots, cache_length=cache_length,
                   max_tokens=max_tokens)


class Requests:
    """What one side's requests carry: the prompt of stream `index` (text for ours, the same
    text's token ids for llama.cpp) and extra request fields."""

    def __init__(self, llamacpp_vocab: int | None = None):
        self.extra_body: dict[str, Any] = {}
        self._encode = None
        if llamacpp_vocab is not None:
            from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
            tokenizer = Tokenizer(default_tokenizer_path())
            self._encode = lambda text: [i % llamacpp_vocab for i in tokenizer.encode(text, add_bos=True)]
            self.extra_body = {'ignore_eos': True, 'cache_prompt': False}

    def prompt(self, index: int) -> str | list[int]:
        text = prompt(index)
        return self._encode(text) if self._encode else text


def start_llamacpp(size: str, fmt: str, slots: int, cache_length: int) -> tuple[Any, str, int]:
    """A `llama-server` on the GGUF of the bench weights: (server, base URL, vocabulary)."""
    import json
    from bench.llamacpp_gguf import ensure_gguf
    from bench.side_llamacpp import Server
    model = ensure_gguf(size, (fmt,))[fmt]
    server = Server(model, slots=slots, cache_length=cache_length, extra=('--cont-batching',))
    server.start()
    vocab = json.loads((common.ensure_weights(size) / common.CONFIG_FILE).read_text())['vocab_size']
    return server, f'{server.url}/v1', vocab


def start_server(service: Any) -> tuple[Any, str]:
    from gemma3n.serving.app import make_server
    server = make_server(service, host='127.0.0.1', port=0, shutdown_s=5)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError('the server did not start')
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, f'http://127.0.0.1:{port}/v1'


def prompt(index: int) -> str:
    words = ('sea', 'sky', 'stone', 'river', 'light', 'wind', 'field', 'bird', 'cloud', 'rain')
    rng = np.random.default_rng(index)
    return ' '.join(words[i] for i in rng.integers(0, len(words), PROMPT_WORDS))


def one_stream(client: Any, requests: Requests, index: int, max_tokens: int) -> dict[str, Any]:
    """One streaming request: arrival times of its text chunks, its completion token count."""
    start = time.perf_counter()
    arrivals, tokens = [], 0
    stream = client.completions.create(model='bench', prompt=requests.prompt(index), max_tokens=max_tokens,
                                       temperature=0, stream=True,
                                       stream_options={'include_usage': True},
                                       extra_body=requests.extra_body)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {'start': start, 'arrivals': arrivals, 'end': time.perf_counter(), 'tokens': tokens}


def measure(client: Any, requests: Requests, streams: int, max_tokens: int, offset: int) -> dict[str, Any]:
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda i: one_stream(client, requests, offset + i, max_tokens),
                             range(streams)))
    wall = max(r['end'] for r in runs) - min(r['start'] for r in runs)
    tokens = sum(r['tokens'] for r in runs)
    ttft = [r['arrivals'][0] - r['start'] for r in runs if r['arrivals']]
    gaps = np.concatenate([np.diff(r['arrivals']) for r in runs if len(r['arrivals']) > 1]
                          or [np.zeros(0)])
    row = {'streams': streams, 'tokens': tokens, 'wall_s': wall, 'tokens_per_s': tokens / wall}
    for p in PERCENTILES:
        row[f'ttft_p{p}_ms'] = float(np.percentile(ttft, p) * 1e3) if ttft else None
        row[f'itl_p{p}_ms'] = float(np.percentile(gaps, p) * 1e3) if gaps.size else None
    return row


def plot(rows: list[dict[str, Any]], title: str, path: Any) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    streams = [r['streams'] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(streams, [r['tokens_per_s'] for r in rows], 'o-', label='measured')
    left.plot(streams, [rows[0]['tokens_per_s'] * s for s in streams], ':', label='linear')
    left.set(xlabel='concurrent streams', ylabel='aggregate tokens/s', xscale='log', yscale='log',
             title='throughput')
    left.legend()
    for p in (50, 90):
        right.plot(streams, [r[f'itl_p{p}_ms'] for r in rows], 'o-', label=f'inter-token p{p}')
        right.plot(streams, [r[f'ttft_p{p}_ms'] for r in rows], 's--', label=f'first token p{p}')
    right.set(xlabel='concurrent streams', ylabel='ms', xscale='log', yscale='log',
              title='latency')
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    # The bench's tiny size has a vocabulary smaller than the packaged tokenizer's: the demo
    # model (the command's, same widths) stands in for it on our side.
    parser.add_argument('--size', choices=('demo', 'tiny', 'reduced', 'full'), default='demo')
    parser.add_argument('--int8', action='store_true')
    parser.add_argument('--llamacpp', choices=('bf16', 'q8_0', 'q4_0'),
                        help="measure llama.cpp's llama-server on this GGUF format instead of ours")
    parser.add_argument('--streams', default=','.join(map(str, STREAMS)),
                        help='concurrencies to measure, comma-separated')
    parser.add_argument('--max-tokens', type=int, default=32)
    args = parser.parse_args()
    import openai

    if args.size == ('demo' if args.llamacpp else 'tiny') or (args.llamacpp and args.int8):
        parser.error('--llamacpp needs --size tiny, reduced or full and no --int8; ours runs demo, '
                     'reduced or full')
    streams = [int(s) for s in args.streams.split(',')]
    machine = common.machine_info()
    if args.llamacpp:
        server, url, vocab = start_llamacpp(args.size, args.llamacpp, max(streams), cache_length=CACHE_LENGTH)
        requests = Requests(llamacpp_vocab=vocab)
    else:
        service = build_service(args.size, args.int8, max(streams), cache_length=CACHE_LENGTH,
                                max_tokens=args.max_tokens)
        server, url = start_server(service)
        requests = Requests()
    client = openai.OpenAI(base_url=url, api_key='unused', max_retries=0, timeout=3600)
    # Compiles the slot prefill and, stream count by stream count, every number of rows a step
    # computes (ours steps the power of two covering the running requests) before any timing.
    for n in streams:
        measure(client, requests, n, WARMUP_TOKENS, WARMUP_PROMPT)
    rows, offset = [], 0
    for n in streams:
        rows.append(measure(client, requests, n, args.max_tokens, offset))
        offset += n
    if args.llamacpp:
        server.stop()
    else:
        server.should_exit = True
    header = ['streams', 'tokens/s', 'x 1 stream', 'TTFT p50 ms', 'TTFT p90 ms', 'ITL p50 ms',
              'ITL p90 ms', 'ITL p99 ms']
    table = common.format_table(header, [
        [r['streams'], r['tokens_per_s'], r['tokens_per_s'] / rows[0]['tokens_per_s'],
         r['ttft_p50_ms'], r['ttft_p90_ms'], r['itl_p50_ms'], r['itl_p90_ms'], r['itl_p99_ms']]
        for r in rows])
    variant = f'llamacpp-{args.llamacpp}' if args.llamacpp else 'int8' if args.int8 else ''
    system = f'llama-server {args.llamacpp}' if args.llamacpp else f'gemma3n serve{" int8" if args.int8 else ""}'
    title = (f'{system}, {args.size}, {args.max_tokens} tokens'
             f' per stream, {os.cpu_count()} CPUs, load {machine["load_average"][0]:.1f}')
    path = common.results_path(f'serve-{args.size}{"-" + variant if variant else ""}')
    common.write_json({'machine': machine, 'end_load_average': os.getloadavg(), 'args': vars(args),
                       'rows': rows, 'table': table}, path)
    plot(rows, title, path.with_suffix('.png'))
    print(title)
    print(table)
    print(f'load average at the end: {os.getloadavg()}; written: {path} and {path.with_suffix(".png")}')


if __name__ == '__main__':
    main()
