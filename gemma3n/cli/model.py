"""The model, weights, tokenizer and images that the command's options choose."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemma3n.audio.audio_file import AudioTruncatedWarning, load_audio
from gemma3n.checkpoints.hf_mapping import check_hf_config, hf_final_logit_softcap
from gemma3n.checkpoints.hf_towers import model_config_from_hf, towers_config_from_hf
from gemma3n.checkpoints.loader import (HF_FORMAT, NATIVE_FORMAT, checkpoint_format,
                                        has_vision_encoder)
from gemma3n.checkpoints.safetensors_hf import CONFIG_FILE, hf_checkpoint_config, read_hf_config
from gemma3n.cli.console import COMPILING_DEMO, PROG, compiling, logger
from gemma3n.cli.sampling import sampling_method
from gemma3n.layout import to_serving
from gemma3n.loading import (CONFIG_JSON_MODEL, DEMO, DEMO_IS_TEXT_ONLY as LIBRARY_DEMO_IS_TEXT_ONLY,
                             DTYPES, TOKENIZER_FILE, LoadedModel, build_model, demo_params,
                             load_checkpoint, preset_name)
from gemma3n.text.sampler import DEFAULT_MAX_OUT_LENGTH
from gemma3n.text.sampling import Greedy
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
from gemma3n.transformer import Gemma3nTransformer
from gemma3n.vision.preprocess import image_file_size, load_image

MODEL_NAMES = {'e4b': 'Gemma 3n E4B', 'e2b': 'Gemma 3n E2B',
               DEMO: 'the built-in demo model (Gemma 3n architecture, small, random weights)',
               CONFIG_JSON_MODEL: 'the Gemma 3n model its config.json describes'}
DEMO_DTYPE = 'float32'
CHECKPOINT_DTYPE = 'bfloat16'     # halves the weights' memory; the checkpoints are stored in it
DEMO_MAX_NEW_TOKENS = 32          # the demo only shows that the pipeline runs: keep it quick
DEMO_IS_TEXT_ONLY = f'{LIBRARY_DEMO_IS_TEXT_ONLY} (--checkpoint PATH)'

DEMO_NOTICE = (
    f'{PROG}: no --checkpoint given: running the built-in demo model (the Gemma 3n architecture '
    'at a small size) with RANDOM weights and a small packaged tokenizer.\n'
    f'{PROG}: its output is gibberish. For real answers, download a Gemma 3n checkpoint '
    '(e.g. Hugging Face google/gemma-3n-E4B-it) and run:\n'
    f'{PROG}:     {PROG} generate --checkpoint PATH/TO/gemma-3n-E4B-it "Why is the sky blue?"')


def model_choice(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    return DEMO if getattr(args, 'checkpoint', None) is None else 'e4b'


def dtype_choice(args: argparse.Namespace, name: str) -> str:
    return args.dtype or (DEMO_DTYPE if name == DEMO else CHECKPOINT_DTYPE)


def checkpoint_path(args: argparse.Namespace) -> Path | None:
    if args.checkpoint is None:
        return None
    path = Path(args.checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    return path


def tokenizer_path(args: argparse.Namespace, checkpoint: Path | None) -> Path:
    if args.tokenizer is not None:
        return Path(args.tokenizer).expanduser()
    if checkpoint is None:
        return default_tokenizer_path()
    directory = checkpoint if checkpoint.is_dir() else checkpoint.parent
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f'no {TOKENIZER_FILE} in {directory}: pass --tokenizer PATH '
                                f'(the Gemma 3n {TOKENIZER_FILE})')
    return path


def load_model(args: argparse.Namespace, *, with_vision: bool = False,
               with_audio: bool = False) -> LoadedModel:
    """The model, weights and tokenizer the options ask for (random weights for the demo)."""
    if with_vision:
        check_vision(args)
    if with_audio:
        check_audio(args)
    checkpoint = checkpoint_path(args)
    tokenizer = Tokenizer(tokenizer_path(args, checkpoint))
    logger.info('tokenizer: %s (%d pieces)', tokenizer.path, tokenizer.vocab_size)
    name, model = choose_model(args, checkpoint, vocab_size=tokenizer.vocab_size,
                               with_vision=with_vision, with_audio=with_audio)
    dtype = model.dtype
    start = time.perf_counter()
    if checkpoint is None:
        sys.stderr.write(DEMO_NOTICE + '\n')
        with compiling(COMPILING_DEMO):
            params = demo_params(model)
        if args.int8:
            model, params = to_serving(model, params, quantize_int8=True, consume=True)
        logger.info('random demo weights made in %.2f s (compilation included)',
                    time.perf_counter() - start)
    else:
        model, params, table = load_checkpoint(checkpoint, model, dtype=dtype,
                                               quantize_int8=args.int8)
        logger.info('checkpoint %s loaded in %.2f s', checkpoint, time.perf_counter() - start)
        return LoadedModel(name=name, model=model, params=params, tokenizer=tokenizer,
                           per_layer_table=table)
    return LoadedModel(name=name, model=model, params=params, tokenizer=tokenizer)


def choose_model(args: argparse.Namespace, checkpoint: Path | None, *, vocab_size: int,
                 with_vision: bool, with_audio: bool = False) -> tuple[str, Gemma3nTransformer]:
    """The model the options choose for `checkpoint` (None: the demo's random weights), and
    its name; `vocab_size`: the demo's."""
    name = model_choice(args)
    if checkpoint is None and name != DEMO:
        raise ValueError(f'--model {name} needs --checkpoint PATH: only the demo model runs '
                         'with random weights')
    dtype = DTYPES[dtype_choice(args, name)]
    if checkpoint is not None:
        return _checkpoint_model(args, checkpoint, dtype=dtype, with_vision=with_vision,
                                 with_audio=with_audio, vocab_size=vocab_size)
    if args.hf_softcap:
        raise ValueError('--hf-softcap applies the softcap of a Hugging Face checkpoint: give '
                         'one with --checkpoint PATH')
    return name, build_model(name, dtype=dtype, with_vision=with_vision, vocab_size=vocab_size)


def _checkpoint_model(args: argparse.Namespace, checkpoint: Path, *, dtype: Any,
                      with_vision: bool, with_audio: bool, vocab_size: int
                      ) -> tuple[str, Gemma3nTransformer]:
    """The model to load `checkpoint` into, and its name (`vocab_size`: the demo's).

    --model when given; else, for a Hugging Face checkpoint with a config.json, the model that
    config describes (with its released towers when images or audio are given); else E4B.
    --hf-softcap takes the final logit softcap of config.json.
    """
    # A checkpoint folder of our format (what fine-tuning writes) has a config.json too.
    hf_config = (read_hf_config(checkpoint)
                 if checkpoint_format(checkpoint) in (HF_FORMAT, NATIVE_FORMAT) else None)
    config_path = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / CONFIG_FILE
    if hf_config is None:
        if args.hf_softcap:
            raise ValueError(f'--hf-softcap takes the softcap from the {CONFIG_FILE} of a Hugging '
                             f'Face checkpoint, and {checkpoint} has none')
        name = model_choice(args)
        return name, build_model(name, dtype=dtype, with_vision=with_vision, vocab_size=vocab_size)
    if args.model is None:       # (check_vision/check_audio have refused what it lacks)
        hf_checkpoint_config(checkpoint, None)           # the text decoder, errors by file
        config = model_config_from_hf(checkpoint, hf_config)
        name = preset_name(dataclasses.replace(config, towers=None))
        model = Gemma3nTransformer(config=config, text_only=not (with_vision or with_audio),
                                   dtype=dtype)
    else:
        name = args.model
        model = build_model(name, dtype=dtype, with_vision=with_vision, vocab_size=vocab_size)
        problems = check_hf_config(hf_config, model.config)
        if problems:
            raise ValueError(f'--model {name} does not fit {config_path}: {"; ".join(problems)}. '
                             f'Leave --model out to load the model {CONFIG_FILE} describes')
    cap = hf_final_logit_softcap(hf_config)
    if args.hf_softcap:
        model = model.clone(config=dataclasses.replace(model.config, final_logit_softcap=cap))
    elif cap != model.config.final_logit_softcap:
        # Capping is monotone: only sampling sees it. A command without sampling options
        # (export) passes the choice on to whoever samples its output, so it warns too.
        greedy = hasattr(args, 'temperature') and isinstance(
            sampling_method(args.temperature, args.top_k, args.top_p), Greedy)
        logger.log(logging.INFO if greedy else logging.WARNING,
                   '%s caps the final logits at %s; like Google\'s reference implementation '
                   'this program does not, so sampled answers differ from transformers\' unless '
                   'you pass --hf-softcap', config_path, cap)
    return name, model


def check_vision(args: argparse.Namespace) -> None:
    """ValueError unless the options choose a model with a vision encoder (checkpoint headers
    only: nothing is loaded or decoded)."""
    if args.text_only:
        raise ValueError('--image needs the vision encoder, which --text-only leaves out')
    if model_choice(args) == DEMO:
        raise ValueError(DEMO_IS_TEXT_ONLY)
    checkpoint = checkpoint_path(args)
    towers = _released_towers(checkpoint)
    if towers is not None and args.model is None:
        if towers.vision is None:
            raise ValueError(f'--image needs a vision tower; the config.json of {checkpoint} '
                             'has no vision_config')
        return
    if checkpoint is not None and not has_vision_encoder(checkpoint):
        raise ValueError(f'--image needs a checkpoint with a vision tower; {checkpoint} '
                         f'({checkpoint_format(checkpoint)} format) holds none')


def _released_towers(checkpoint: Path | None) -> Any:
    """The released towers a HF checkpoint's config.json describes (None: none, or not HF)."""
    if checkpoint is None or checkpoint_format(checkpoint) != HF_FORMAT:
        return None
    hf_config = read_hf_config(checkpoint)
    return None if hf_config is None else towers_config_from_hf(hf_config)


def check_audio(args: argparse.Namespace) -> None:
    """ValueError unless the options choose a model with the released audio tower (config.json
    only: nothing is loaded or decoded)."""
    if args.text_only:
        raise ValueError('--audio needs the audio tower, which --text-only leaves out')
    if model_choice(args) == DEMO:
        raise ValueError('the demo model is text-only: --audio needs a Gemma 3n checkpoint with '
                         'the audio tower (--checkpoint PATH)')
    checkpoint = checkpoint_path(args)
    towers = _released_towers(checkpoint)
    if args.model is not None or towers is None or towers.audio is None:
        raise ValueError(f'--audio needs a Hugging Face Gemma 3n checkpoint whose config.json has '
                         f'an audio_config (the released ones do); {checkpoint} has none'
                         + (' (or leave out --model: the towers come with the model config.json '
                            'describes)' if args.model is not None else ''))


def audio_options(args: argparse.Namespace) -> list[Any]:
    """The `--audio` files as 16 kHz samples (read before any weights, to fail early); a clip
    longer than the tower takes is noted in one line, naming what is kept."""
    if args.audio:
        check_audio(args)
    clips = []
    for path in args.audio:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', AudioTruncatedWarning)
            clips.append(load_audio(Path(path).expanduser()))
        for warning in caught:
            sys.stderr.write(f'{PROG}: note: {warning.message}\n')
    return clips


def read_images(paths: Sequence[str]) -> list[np.ndarray]:
    """The `--image` files as uint8 [H, W, 3] arrays (read before any weights, to fail early).

    Every file's header is checked (size, format) before any file is decoded.
    """
    files = [Path(path).expanduser() for path in paths]
    for path in files:
        image_file_size(path)
    return [load_image(path) for path in files]


def image_options(args: argparse.Namespace) -> list[np.ndarray]:
    """The `--image` files, once the model is known to take images."""
    if args.image:
        check_vision(args)
    return read_images(args.image)


def max_new_tokens_of(args: argparse.Namespace, loaded: LoadedModel) -> int:
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return DEMO_MAX_NEW_TOKENS if loaded.is_demo else DEFAULT_MAX_OUT_LENGTH
