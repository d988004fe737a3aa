"""The `transformers` side of the benchmark: Gemma3nForCausalLM in torch on CPU, bfloat16, with
its own dynamic KV cache, greedy decoding in a manual loop (`logits_to_keep=1`, as ours).

Run by `bench.run`; by hand:
    python -m bench.side_hf --size reduced --weights bench/results/weights/reduced --out hf.json
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from bench import common

ATTENTION = os.environ.get('BENCH_HF_ATTENTION', 'sdpa')   # or 'eager'


class HFRunner(common.GreedyRunner):
    def __init__(self, model: transformers.Gemma3nForCausalLM):
        self.model = model
        self._cache = None
        self._next = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, cache=self._cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    @torch.inference_mode()
    def start(self, tokens: np.ndarray, max_new_tokens: int) -> tuple[np.ndarray, int]:
        self._cache = transformers.DynamicCache(config=self.model.config)
        logits = self._forward(torch.from_numpy(tokens).long()).float()
        self._next = logits.argmax()
        return logits.numpy(), int(self._next)

    @torch.inference_mode()
    def step(self) -> int:
        self._next = self._forward(self._next.view(1, 1)).argmax()
        return int(self._next)


def build(weights: Path, size: str) -> tuple[common.GreedyRunner, dict[str, Any]]:
    del size   # the directory's config.json says it
    torch.set_num_threads(os.cpu_count())
    model = transformers.Gemma3nForCausalLM.from_pretrained(
        weights, dtype=torch.bfloat16, attn_implementation=ATTENTION).eval()
    # Ours has no final softcap; with it off, both sides' logits are the same function. HF's strict
    # config refuses None, but reads the attribute at run time (as tests/hf_oracle.py does).
    object.__setattr__(model.config, 'final_logit_softcapping', None)
    return HFRunner(model), {'name': f'transformers ({ATTENTION})', 'transformers': transformers.__version__,
                             'torch': torch.__version__, 'torch_threads': torch.get_num_threads()}


if __name__ == '__main__':
    common.side_main(__doc__, build)
