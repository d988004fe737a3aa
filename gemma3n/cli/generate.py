"""`gemma3n generate`: answer one prompt, streaming the text to stdout."""

from __future__ import annotations

import argparse

from gemma3n.cli.console import COMPILING_PROMPT, Timer, compiling, write
from gemma3n.cli.model import load_with_media, max_new_tokens_of
from gemma3n.cli.sampling import sampling_method
from gemma3n.text.chat_format import format_user_turn
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH


def default_cache_length(positions: int) -> int:
    """A cache for `positions`: DEFAULT_CACHE_LENGTH, or the power of two that fits them.

    Few distinct lengths keep the compiled programs reusable (the cache's shape is part of them).
    """
    return max(DEFAULT_CACHE_LENGTH, 1 << (positions - 1).bit_length())


def run_generate(args: argparse.Namespace) -> int:
    sampling = sampling_method(args.temperature, args.top_k, args.top_p)
    loaded, pictures, clips = load_with_media(args)
    max_new_tokens = max_new_tokens_of(args, loaded)
    sampler = loaded.sampler(sampling=sampling, prefill_chunk=args.prefill_chunk)
    [prompt], images = sampler.prompt_images([args.prompt], pictures or None, single=True)
    [prompt], audio = sampler.prompt_audio([prompt], clips or None, single=True)
    text = prompt if args.raw else format_user_turn(prompt)
    ids = sampler.encode(text, add_bos=True)
    positions = int(sampler.engine.prompt_positions(
        [len(ids)], 0 if images is None else images.shape[1],
        0 if audio is None else audio.num_clips)[0]) + max_new_tokens
    sampler.cache_length = args.cache_length or default_cache_length(positions)
    run = sampler.generation([ids], max_new_tokens, rng=args.seed, images=images, audio=audio,
                             stop_tokens=sampler.text_stop_tokens())
    timer = Timer()
    with compiling(COMPILING_PROMPT):
        for piece in timer.watch(sampler.stream_text(run)):
            write(piece)
    write('\n')
    timer.report(int(run.lengths[0]))
    return 0
