"""`gemma3n info`: a model's layers, parameter counts and memory."""

from __future__ import annotations

import argparse
import sys

from gemma3n.cli.model import dtype_choice, model_choice, tokenizer_path
from gemma3n.describe import describe_model
from gemma3n.loaded_model import DEMO, MODEL_NAMES
from gemma3n.loading import DTYPES, build_model
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH
from gemma3n.text.tokenizer import Tokenizer


def run_info(args: argparse.Namespace) -> int:
    name = model_choice(args)
    dtype_name = dtype_choice(args, name)
    vocab_size = None
    if name == DEMO:
        vocab_size = Tokenizer(tokenizer_path(args)).vocab_size
    with_vision = name != DEMO and not args.text_only
    model = build_model(name, dtype=DTYPES[dtype_name], with_vision=with_vision,
                        vocab_size=vocab_size)
    sys.stdout.write(describe_model(model, MODEL_NAMES[name], dtype_name,
                                    args.cache_length or DEFAULT_CACHE_LENGTH,
                                    int8_label='with --int8', int4_label='with --int4'))
    return 0
