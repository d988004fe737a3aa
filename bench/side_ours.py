"""Our side of the benchmark: `gemma3n` (JAX, bfloat16 weights and cache) through `Sampler`.

Variants (`--variant`), so each optimisation is measured on its own:
  plain:   the checkpoint layout, the per-layer table inside the compiled steps;
  serving: `gemma3n.load`: weights re-laid out [out, in] while loading, the per-layer table read
           lazily from the checkpoint file, only the rows the tokens need;
  int8:    serving, with the large weights quantized to int8 per output channel.
  int4:    serving, with the large weights in int4 (groups of 32 with a float16 scale).

Run by `bench.run`; by hand:
    python -m bench.side_ours --size reduced --weights bench/results/weights/reduced --out ours.json
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import gemma3n
from bench import common
from gemma3n.checkpoints import load_params
from gemma3n.compilation import use_compilation_cache
from gemma3n.host_arrays import to_device
from gemma3n.text.sampler import Sampler
from gemma3n.transformer import Gemma3nTransformer

# Positions the KV cache holds: the 512-token prompt plus the decoded tokens fit.
CACHE_LENGTH = 1024
VARIANTS = ('plain', 'serving', 'int8', 'int4')


def load_to_device(weights: Path, model: Gemma3nTransformer) -> dict[str, Any]:
    """Loads the checkpoint as bfloat16, each leaf onto the JAX device as it is read (the aligned
    host buffer is adopted, not copied)."""
    return load_params(weights, model=model, dtype=jnp.bfloat16, progress=False,
                       transform=lambda path, value: jax.block_until_ready(to_device(value)))


class OursRunner(common.GreedyRunner):
    """Greedy generation through `Sampler.generation` (one compiled prefill, one compiled step)."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self._steps = None

    def start(self, tokens: np.ndarray, max_new_tokens: int) -> tuple[np.ndarray, int]:
        run = self.sampler.generation(tokens, max_new_tokens, keep_logits=True)
        self._steps = iter(run)
        token = next(self._steps)
        return np.asarray(run.logits[-1][0], np.float32), int(token[0])

    def step(self) -> int:
        return int(next(self._steps)[0])


def build(weights: Path, size: str, variant: str) -> tuple[common.GreedyRunner, dict[str, Any]]:
    if os.environ.get(common.COMPILATION_CACHE_ENV):
        # As `gemma3n` commands do: compiled and traced programs kept (bench.run --compile-cache).
        use_compilation_cache(Path(os.environ[common.COMPILATION_CACHE_ENV]))
    model = Gemma3nTransformer(config=common.bench_config(size), text_only=True, dtype=jnp.bfloat16)
    if variant == 'plain':
        sampler = Sampler(model=model, params=load_to_device(weights, model), cache_length=CACHE_LENGTH,
                          cache_dtype=jnp.bfloat16)
    else:
        # The weights have no tokenizer beside them: the bench feeds token ids.
        loaded = gemma3n.load(weights, model=model, quantize=variant if variant in ('int8', 'int4') else None,
                              tokenizer=False, progress=False)
        sampler = loaded.sampler(cache_length=CACHE_LENGTH, cache_dtype=jnp.bfloat16)
    return OursRunner(sampler), {'name': f'ours {variant}', 'variant': variant, 'jax': jax.__version__,
                                 'backend': jax.default_backend(), 'cache_length': CACHE_LENGTH}


if __name__ == '__main__':
    common.side_main(__doc__, build, variants=VARIANTS)
