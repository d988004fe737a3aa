"""`gemma3n info`: a model's layers, parameter counts and memory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gemma3n.checkpoints.loader import open_checkpoint
from gemma3n.cli.model import dtype_choice, model_choice, tokenizer_path
from gemma3n.describe import describe_model
from gemma3n.loaded_model import DEMO, MODEL_NAMES
from gemma3n.model_choice import DTYPES, build_model, checkpoint_model
from gemma3n.transformer import Gemma3nTransformer
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH
from gemma3n.text.tokenizer import Tokenizer


def run_info(args: argparse.Namespace) -> int:
    name = model_choice(args)
    dtype_name = dtype_choice(args, name)
    if args.checkpoint is not None:
        name, model = _config_json_model(Path(args.checkpoint).expanduser(), args,
                                         DTYPES[dtype_name])
    else:
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


def _config_json_model(path: Path, args: argparse.Namespace, dtype: Any
                       ) -> tuple[str, Gemma3nTransformer]:
    """The model (towers included unless --text-only) a HF checkpoint's config.json describes,
    and its name."""
    if args.model is not None:
        raise ValueError('info takes --model or --checkpoint, not both')
    if not path.exists():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    checkpoint = open_checkpoint(path)
    if checkpoint.hf_config is None:
        raise ValueError(f'info --checkpoint reads the config.json of a Hugging Face checkpoint; '
                         f'{path} has none')
    return checkpoint_model(checkpoint, dtype=dtype, towers=not args.text_only)
