"""The model, weights, tokenizer and images that the command's options choose.

The library's `gemma3n.loading` does the work; this module turns options into its arguments and
speaks to the command's user (notices, the softcap note, option names in errors).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemma3n.audio.audio_file import AudioTruncatedWarning, load_audio
from gemma3n.checkpoints.loader import Checkpoint
from gemma3n.checkpoints.peft_adapter import Adapter, load_adapter
from gemma3n.checkpoints.safetensors_hf import config_file
from gemma3n.cli.console import COMPILING_DEMO, PROG, compiling, logger
from gemma3n.cli.sampling import sampling_method
from gemma3n.loaded_model import LoadedModel
from gemma3n.loading import DEMO, QUANTIZE_FORMATS, LoadPlan, prepare
from gemma3n.model_choice import default_dtype
from gemma3n.sharding import make_mesh
from gemma3n.text.sampler import DEFAULT_MAX_OUT_LENGTH
from gemma3n.engine.sampling import Greedy
from gemma3n.text.tokenizer import default_tokenizer_path
from gemma3n.tower_checks import check_audio, check_vision
from gemma3n.training.lora import apply_adapter
from gemma3n.vision.preprocess import image_file_size, load_image

DEMO_MAX_NEW_TOKENS = 32          # the demo only shows that the pipeline runs: keep it quick
# `gemma3n.load`'s parameters as this command spells them, for the errors that name them.
LOAD_OPTION_FLAGS = {'path': '--checkpoint', 'model': '--model', 'tokenizer': '--tokenizer',
                     'dtype': '--dtype', 'quantize': '--int8/--int4', 'hf_softcap': '--hf-softcap',
                     'with_vision': '--image', 'with_audio': '--audio'}

DEMO_NOTICE = (
    f'{PROG}: no --checkpoint given: running the built-in demo model (the Gemma 3n architecture '
    'at a small size) with RANDOM weights and a small packaged tokenizer.\n'
    f'{PROG}: its output is gibberish. For real answers, download a Gemma 3n checkpoint '
    '(e.g. Hugging Face google/gemma-3n-E4B-it) and run:\n'
    f'{PROG}:     {PROG} generate --checkpoint PATH/TO/gemma-3n-E4B-it "Why is the sky blue?"')


def model_choice(args: argparse.Namespace) -> str:
    """The model name the options choose without reading a checkpoint (`info`)."""
    return args.model or DEMO


def dtype_choice(args: argparse.Namespace, name: str) -> str:
    return args.dtype or default_dtype(name)


def tokenizer_path(args: argparse.Namespace) -> Path:
    """The tokenizer of a model without a checkpoint (`info`)."""
    return default_tokenizer_path() if args.tokenizer is None else Path(args.tokenizer).expanduser()


def plan_model(args: argparse.Namespace, *, checkpoint: Checkpoint | None = None,
               with_vision: bool = False, with_audio: bool = False) -> LoadPlan:
    """The load the options ask for, checked (nothing is read yet). A released checkpoint's
    towers are loaded only for images or audio (`with_vision`, `with_audio`): text needs none.

    `checkpoint`: --checkpoint already opened (by `image_options`, `audio_options`).
    """
    plan = prepare(checkpoint or args.checkpoint, model=args.model, dtype=args.dtype,
                   quantize=next((fmt for fmt in QUANTIZE_FORMATS if getattr(args, fmt, False)),
                                 None),
                   tokenizer=args.tokenizer, with_vision=with_vision, with_audio=with_audio,
                   towers=False, hf_softcap=args.hf_softcap)
    if plan.unused_softcap is not None:
        # Capping is monotone: only sampling sees it. A command without sampling options
        # (export, finetune) passes the choice on to whoever samples its output, so it warns too.
        greedy = hasattr(args, 'temperature') and isinstance(
            sampling_method(args.temperature, args.top_k, args.top_p), Greedy)
        logger.log(logging.INFO if greedy else logging.WARNING,
                   '%s caps the final logits at %s; like Google\'s reference implementation '
                   'this program does not, so sampled answers differ from transformers\' unless '
                   'you pass --hf-softcap', config_file(plan.checkpoint.path), plan.unused_softcap)
    return plan


def load_model(args: argparse.Namespace, *, checkpoint: Checkpoint | None = None,
               with_vision: bool = False, with_audio: bool = False) -> LoadedModel:
    """The model, weights and tokenizer the options ask for (random weights for the demo);
    arguments as for `plan_model`."""
    plan = plan_model(args, checkpoint=checkpoint, with_vision=with_vision,
                      with_audio=with_audio)
    adapter = read_adapter(args, plan.model.config)
    mesh = make_mesh(args.mesh) if getattr(args, 'mesh', None) else None
    if plan.checkpoint is not None:
        loaded = plan.load(mesh=mesh)
    else:
        sys.stderr.write(DEMO_NOTICE + '\n')
        with compiling(COMPILING_DEMO):
            loaded = plan.load(mesh=mesh)
    if adapter is not None:
        loaded.params = apply_adapter(adapter, loaded.config, loaded.params)
    return loaded


def load_with_media(args: argparse.Namespace
                    ) -> tuple[LoadedModel, list[np.ndarray], list[np.ndarray]]:
    """The `--image` and `--audio` files, each kind read once the checkpoint is known to take it,
    and then the model loaded with the towers they need: (model, images as uint8 [H, W, 3],
    clips as 16 kHz samples [T])."""
    pictures, checkpoint = image_options(args)
    clips, checkpoint = audio_options(args, checkpoint)
    loaded = load_model(args, checkpoint=checkpoint, with_vision=bool(pictures),
                        with_audio=bool(clips))
    return loaded, pictures, clips


def read_adapter(args: argparse.Namespace, config: Any) -> Adapter | None:
    """The --adapter of the options, checked against `config` (before any weights are read);
    None without one."""
    if getattr(args, 'adapter', None) is None:
        return None
    adapter = load_adapter(Path(args.adapter).expanduser(), config)
    logger.info('LoRA adapter %s: rank %d, alpha %g, %s (trained on %s)', args.adapter,
                adapter.rank, adapter.alpha, ','.join(adapter.targets),
                adapter.base or 'the demo model')
    return adapter


def audio_options(args: argparse.Namespace, checkpoint: Checkpoint | None
                  ) -> tuple[list[np.ndarray], Checkpoint | None]:
    """The `--audio` files as 16 kHz samples, once the model is known to take audio (from the
    checkpoint's config.json), read before any weights to fail early; a clip longer than the
    tower takes is noted in one line, naming what is kept. Returns them and the checkpoint
    opened (`checkpoint`, from `image_options`, when given)."""
    if not args.audio:
        return [], checkpoint
    if args.text_only:
        raise ValueError('--audio needs the audio tower, which --text-only leaves out')
    checkpoint = check_audio(checkpoint or args.checkpoint, args.model)
    clips = []
    for path in args.audio:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', AudioTruncatedWarning)
            clips.append(load_audio(Path(path).expanduser()))
        for warning in caught:
            sys.stderr.write(f'{PROG}: note: {warning.message}\n')
    return clips, checkpoint


def read_images(paths: Sequence[str]) -> list[np.ndarray]:
    """The `--image` files as uint8 [H, W, 3] arrays (read before any weights, to fail early).

    Every file's header is checked (size, format) before any file is decoded.
    """
    files = [Path(path).expanduser() for path in paths]
    for path in files:
        image_file_size(path)
    return [load_image(path) for path in files]


def image_options(args: argparse.Namespace) -> tuple[list[np.ndarray], Checkpoint | None]:
    """The `--image` files, once the model is known to take images (from the checkpoint's
    headers), and the checkpoint opened to know it (None without --image)."""
    if not args.image:
        return [], None
    if args.text_only:
        raise ValueError('--image needs the vision encoder, which --text-only leaves out')
    checkpoint = check_vision(args.checkpoint, args.model)
    return read_images(args.image), checkpoint


def max_new_tokens_of(args: argparse.Namespace, loaded: LoadedModel) -> int:
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return DEMO_MAX_NEW_TOKENS if loaded.is_demo else DEFAULT_MAX_OUT_LENGTH
