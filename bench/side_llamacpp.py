"""The llama.cpp side of the benchmark: the same random checkpoint as GGUF (bf16, q8_0 or q4_0).

Speed comes from `llama-bench` (llama.cpp's own timing tool), the rest from one `llama-server`
process serving the same weights:
- prefill tok/s, 128 and 512 tokens: `llama-bench -p 128,512 -n 0`, the best of `--repeats`
  runs (ours: best of `--repeats` too);
- decode tok/s: `llama-bench -n <decode tokens> -d 128`, the mean of `--repeats` runs: decoding
  after a 128-token context, as ours does after its 128-token prompt;
- load s: starting `llama-server` until `/health` answers (model mapped or read, its warm-up
  run done: llama.cpp's analogue of our compilation);
- time to first token: the server's first request, the 128-token prompt (token ids, no BOS)
  and one token; then the first 512-token prompt;
- greedy tokens after the 128-token prompt (`ignore_eos`) and the first token's log-probabilities
  (the server's softmax of the raw logits, the top `FIRST_LOGPROBS` ids) to check that both sides
  compute the same model;
- peak resident memory: the server's VmHWM at the end (mapped GGUF pages count, as they do in
  ours), and its private and mapped-file pages then; llama-bench's own peak is in the JSON.
Every program runs with one thread per CPU, as ours does.

Run by `bench.run` (`--sides llamacpp-bf16,...`); by hand:
    python -m bench.side_llamacpp --size tiny --format bf16 --weights bench/results/weights/tiny --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench import common, process_memory
from bench.llamacpp_build import BIN, SOURCE, SOURCE_STAMP
from bench.llamacpp_gguf import FORMATS, ensure_gguf

CACHE_LENGTH = 1024          # as ours (bench/side_ours.py): the 512-token prompt plus decoding fit
FIRST_LOGPROBS = 1024        # ids whose first-token log-probability is compared (all of the tiny size's)
START_TIMEOUT_S = 1800
REQUEST_TIMEOUT_S = 3600
HEALTH_POLL_S = 0.02


def _threads() -> int:
    return os.cpu_count() or 1


def _run_measured(cmd: list) -> tuple[str, int]:
    """Runs `cmd`; returns its stdout and its peak resident memory in bytes (Linux: KiB)."""
    process = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f'`{" ".join(map(str, cmd))}` failed with exit status {process.returncode}')
    return out, usage.ru_maxrss * 1024


def llama_bench(model: Path, decode_tokens: int, repeats: int) -> dict[str, Any]:
    """Prefill (128, 512) and decode-after-128 rates from `llama-bench -o json`."""
    short, long = common.PROMPT_LENGTHS
    base = [BIN / 'llama-bench', '-m', model, '-t', _threads(), '-r', repeats, '-o', 'json']
    out, prefill_rss = _run_measured([*base, '-p', f'{short},{long}', '-n', 0])
    prefill = {row['n_prompt']: row for row in json.loads(out)}
    out, decode_rss = _run_measured([*base, '-p', 0, '-n', decode_tokens, '-d', short])
    decode = json.loads(out)[0]
    result = {f'prefill{n}_tok_s': max(prefill[n]['samples_ts']) for n in (short, long)}
    result.update(decode_tok_s=decode['avg_ts'], decode_samples_tok_s=decode['samples_ts'],
                  prefill_samples_tok_s={n: prefill[n]['samples_ts'] for n in (short, long)},
                  llama_bench_peak_rss_gb=max(prefill_rss, decode_rss) / common.GB,
                  cpu_info=decode.get('cpu_info'), threads=decode.get('n_threads'),
                  source=(SOURCE / SOURCE_STAMP).read_text())
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    """A `llama-server` child process on loopback; `start()` returns once it serves."""

    def __init__(self, model: Path, *, slots: int = 1, cache_length: int = CACHE_LENGTH,
                 extra: tuple[str, ...] = ()):
        self.port = _free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        # The context is shared by the slots: each gets cache_length positions.
        self.cmd = [BIN / 'llama-server', '-m', model, '-t', _threads(), '-c', cache_length * slots,
                    '--parallel', slots, '--host', '127.0.0.1', '--port', self.port, *extra]
        self.process: subprocess.Popen | None = None
        self.log = common.RESULTS_DIR / 'scratch' / f'llama-server-{self.port}.log'

    def start(self) -> float:
        """Starts the server; returns the seconds until `/health` answers."""
        if not (BIN / 'llama-server').exists():
            raise SystemExit(f'{BIN / "llama-server"} is missing: run `python -m bench.llamacpp_build` first')
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with common.Stopwatch() as watch, open(self.log, 'w') as log:
            self.process = subprocess.Popen([str(c) for c in self.cmd], stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self._healthy():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f'llama-server did not start (its output: {self.log}): '
                                       f'{" ".join(map(str, self.cmd))}')
                time.sleep(HEALTH_POLL_S)
        return watch.seconds

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f'{self.url}/health', timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f'{self.url}{path}', data=json.dumps(body).encode(),
                                         headers={'Content-Type': 'application/json'})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return json.loads(response.read())

    def memory_gb(self) -> dict[str, float]:
        """`process_memory.STATUS_FIELDS` of the server, in GB."""
        status = process_memory.status_bytes(self.process.pid)
        return {key: value / common.GB for key, value in status.items()}

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> 'Server':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def greedy(server: Server, tokens: list[int], n: int, logprobs: int = 0) -> dict[str, Any]:
    """One greedy completion of token ids `tokens` (no BOS is added to an id prompt), n tokens,
    never stopping early; the prompt is not cached, so every request prefills it."""
    return server.post('/completion', {
        'prompt': tokens, 'n_predict': n, 'temperature': 0, 'top_k': 1, 'ignore_eos': True,
        'cache_prompt': False, 'return_tokens': True, 'n_probs': logprobs,
        'post_sampling_probs': False})


def server_measurements(model: Path, vocab: int, decode_tokens: int) -> dict[str, Any]:
    """Load, first token, first 512-token prompt, greedy tokens, first-token log-probabilities
    and memory of one `llama-server` process (module docstring)."""
    prompts = {n: common.prompt_tokens(n, vocab)[0].tolist() for n in common.PROMPT_LENGTHS}
    short, long = common.PROMPT_LENGTHS
    result: dict[str, Any] = {}
    with Server(model) as server:
        result['load_s'] = server.start()
        result['rss_after_load_gb'] = server.memory_gb()['VmRSS']
        for key, length in (('ttft_s', short), ('prefill512_first_call_s', long)):
            with common.Stopwatch() as watch:
                answer = greedy(server, prompts[length], 1)
            result[key] = watch.seconds
            if answer['timings']['prompt_n'] != length:   # a BOS or a cached prefix would show here
                raise RuntimeError(f'llama-server prefilled {answer["timings"]["prompt_n"]} tokens, not {length}')
        first = greedy(server, prompts[short], 1, logprobs=min(vocab, FIRST_LOGPROBS))
        top = first['completion_probabilities'][0]['top_logprobs']
        result['first_top_logprobs'] = {'ids': [t['id'] for t in top], 'logprobs': [t['logprob'] for t in top]}
        # As ours: the first token and decode_tokens + 1 steps after the 128-token prompt.
        run = greedy(server, prompts[short], decode_tokens + 2)
        result['decode_tokens'] = run['tokens']
        result['server_timings'] = run['timings']
        memory = server.memory_gb()
        result.update(peak_rss_gb=memory['VmHWM'], rss_private_end_gb=memory['RssAnon'],
                      rss_file_end_gb=memory['RssFile'])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', choices=common.SIZES, required=True)
    parser.add_argument('--format', choices=FORMATS, required=True)
    parser.add_argument('--weights', type=Path, required=True, help='the bench checkpoint (its config.json)')
    parser.add_argument('--out', type=Path, required=True, help='JSON file to write')
    parser.add_argument('--decode-tokens', type=int, default=16)
    parser.add_argument('--repeats', type=int, default=2)
    args = parser.parse_args()
    model = ensure_gguf(args.size, (args.format,))[args.format]
    vocab = json.loads((args.weights / common.CONFIG_FILE).read_text())['vocab_size']
    result = {'name': f'llama.cpp {args.format}', 'format': args.format, 'gguf': str(model),
              'gguf_gb': model.stat().st_size / common.GB, 'cache_length': CACHE_LENGTH}
    result.update(server_measurements(model, vocab, args.decode_tokens))
    result.update(llama_bench(model, args.decode_tokens, args.repeats))
    common.write_json(result, args.out)


if __name__ == '__main__':
    main()
