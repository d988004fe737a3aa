"""`gemma3n info`: a model's layers, parameter counts and memory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gemma3n.checkpoints.hf_towers import model_config_from_hf
from gemma3n.checkpoints.safetensors_hf import read_hf_config
from gemma3n.cli.model import MODEL_NAMES, dtype_choice, model_choice, tokenizer_path
from gemma3n.describe import describe_model
from gemma3n.loading import CONFIG_JSON_MODEL, DEMO, DTYPES, build_model
from gemma3n.transformer import Gemma3nTransformer
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH
from gemma3n.text.tokenizer import Tokenizer


def run_info(args: argparse.Namespace) -> int:
    name = model_choice(args)
    dtype_name = dtype_choice(args, name)
    if args.checkpoint is not None:
        model = _config_json_model(Path(args.checkpoint).expanduser(), args, DTYPES[dtype_name])
        name = CONFIG_JSON_MODEL
    else:
        vocab_size = None
        if name == DEMO:
            vocab_size = Tokenizer(tokenizer_path(args, None)).vocab_size
        with_vision = name != DEMO and not args.text_only
        model = build_model(name, dtype=DTYPES[dtype_name], with_vision=with_vision,
                            vocab_size=vocab_size)
    sys.stdout.write(describe_model(model, MODEL_NAMES[name], dtype_name,
                                    args.cache_length or DEFAULT_CACHE_LENGTH,
                                    int8_label='with --int8'))
    return 0


def _config_json_model(path: Path, args: argparse.Namespace, dtype: Any) -> Gemma3nTransformer:
    """The model (towers included unless --text-only) a HF checkpoint's config.json describes."""
    if args.model is not None:
        raise ValueError('info takes --model or --checkpoint, not both')
    hf_config = read_hf_config(path) if path.exists() else None
    if hf_config is None:
        raise ValueError(f'info --checkpoint reads the config.json of a Hugging Face checkpoint; '
                         f'{path} has none')
    return Gemma3nTransformer(config=model_config_from_hf(path, hf_config),
                              text_only=args.text_only, dtype=dtype)
