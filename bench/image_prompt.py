"""Time to first token of an image prompt through the released model's path (ours only).

The model: the full MobileNet-V5 vision tower (768 x 768 images, 256 soft tokens) and its
embedder, in front of a Gemma 3n text decoder of E4B's widths with `--layers` layers and a
`--vocab` vocabulary (the full E4B decoder does not fit beside the tower on a small machine),
random float32 weights. One photo-like 683 x 1024 image goes in with a short prompt through
`Sampler.sample`: the time of the first token is preprocessing (resize on the host) + the tower +
the prompt's prefill; the first run includes compilation, the warm ones (best of `--repeats`)
do not. Prints the figures and the load average, and writes them as JSON to
`bench/results/image-prompt-<UTC time>.json`.

transformers' side (its vision tower needs timm) is in bench/vision_tower.py where timm imports.
Run by hand from the repository root:
    python -m bench.image_prompt [--layers 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from bench.common import RESULTS_DIR
from bench.vision_tower import IMAGE_SHAPE, photo
from gemma3n.config import TransformerConfig
from gemma3n.models import E4B_HIDDEN_DIM
from gemma3n.multimodal import BlockIds
from gemma3n.text.sampler import Sampler
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
from gemma3n.towers_config import TowersConfig
from gemma3n.transformer import Gemma3nTransformer

PROMPT = '<start_of_image>Describe this picture.'
IMAGE_MARKER = 4000          # an ordinary id of the small vocabulary


def build(layers: int, vocab: int) -> tuple[Gemma3nTransformer, dict]:
    towers = TowersConfig(audio=None, vision_vocab_offset=vocab,
                          image_ids=BlockIds(marker=IMAGE_MARKER, placeholder=vocab + 1, end=vocab))
    config = TransformerConfig.gemma3n(
        num_layers=layers, num_shared_layers=layers - 2, num_sparse_layers=min(layers, 2),
        hidden_dim=E4B_HIDDEN_DIM, num_embed=vocab, towers=towers)
    model = Gemma3nTransformer(config=config, dtype=jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 1), jnp.int32))['params']
    return model, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layers', type=int, default=5)
    parser.add_argument('--vocab', type=int, default=4096)
    parser.add_argument('--repeats', type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, params = build(args.layers, args.vocab)
    built = time.perf_counter() - start
    sampler = Sampler(model=model, params=params, tokenizer=Tokenizer(default_tokenizer_path()),
                      cache_length=512)
    image = photo(*IMAGE_SHAPE)
    times = []
    for _ in range(1 + args.repeats):
        start = time.perf_counter()
        sampler.sample(PROMPT, images=[image], max_new_tokens=1)
        times.append(time.perf_counter() - start)
    result = dict(
        layers=args.layers, vocab=args.vocab, image_shape=IMAGE_SHAPE,
        init_s=round(built, 2), first_token_cold_s=round(times[0], 2),
        first_token_warm_s=round(min(times[1:]), 2) if args.repeats else None,
        load_average=os.getloadavg(), cpus=os.cpu_count(), jax_backend=jax.default_backend())
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write('\n')
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    (RESULTS_DIR / f'image-prompt-{stamp}.json').write_text(json.dumps(result, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
