"""Writes random bfloat16 weights of a benchmark size as a Hugging Face Gemma 3n directory.

Usually called through `bench.common.ensure_weights`; by hand:
    python -m bench.make_weights --size reduced --out bench/results/weights/reduced
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench import common
from gemma3n.checkpoints import hf_mapping

HF_ARCHITECTURE = 'Gemma3nForCausalLM'


def weight_specs(config) -> list[tuple[str, tuple[int, ...], float, bool]]:
    """(HF key, HF shape, std, is_scale) of every tensor; the vocabulary has no extra HF rows so
    both sides produce logits over the same num_embed tokens."""
    specs = []
    for entry in hf_mapping.mapping_entries(config, hf_vocab_size=config.num_embed):
        if entry.is_scale:
            std = common.SCALE_NOISE
        else:
            std = math.prod(entry.shape[axis] for axis in entry.in_axes) ** -0.5
        for key, shape in zip(entry.hf_keys, entry.hf_shapes):
            specs.append((common.HF_PREFIX + key, shape, std, entry.is_scale))
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--size', choices=common.SIZES, required=True)
    parser.add_argument('--out', type=Path, required=True)
    args = parser.parse_args()

    config = common.bench_config(args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    hf_config = hf_mapping.hf_text_config(config, hf_vocab_size=config.num_embed)
    hf_config.update(model_type='gemma3n_text', architectures=[HF_ARCHITECTURE], dtype='bfloat16')
    (args.out / common.CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
    specs = weight_specs(config)
    total = sum(math.prod(shape) for _, shape, _, _ in specs)
    print(f'Writing {total / 1e9:.2f}B random bfloat16 weights ({total * common.BF16_BYTES / common.GB:.1f} GB) '
          f'to {args.out} ...', flush=True)
    with common.Stopwatch() as watch:
        common.write_random_safetensors(args.out / common.WEIGHTS_FILE, specs, common.WEIGHT_SEED)
    print(f'  done in {watch.seconds:.0f} s', flush=True)


if __name__ == '__main__':
    main()
