"""Whether a checkpoint holds the towers `gemma3n.load(with_vision=True / with_audio=True)` asks
for, judged from its headers and config.json alone, so that a missing tower is refused before
any weight (or the caller's image or clip) is read.

Example:
    >>> checkpoint = check_vision('gemma-3n-E4B-it')   # LoadError if it has no vision encoder
    >>> gemma3n.load(checkpoint, with_vision=True)
"""

from __future__ import annotations

import os
from typing import Any

from gemma3n.checkpoints.hf_towers import model_config_from_hf
from gemma3n.checkpoints.loader import Checkpoint, existing_checkpoint, has_vision_encoder, open_checkpoint
from gemma3n.config import TransformerConfig
from gemma3n.load_error import PATH, LoadError
from gemma3n.loaded_model import DEMO
from gemma3n.model_choice import DEMO_IS_TEXT_ONLY
from gemma3n.towers_config import TowersConfig
from gemma3n.transformer import Gemma3nTransformer


def check_vision(path: str | os.PathLike | Checkpoint | None,
                 model: str | Gemma3nTransformer | TransformerConfig | None = None
                 ) -> Checkpoint | None:
    """LoadError unless the checkpoint at `path` (None: the demo) holds the vision encoder that
    `with_vision=True` asks for, judged from its headers and config.json alone: SigLIP, or (a
    Hugging Face checkpoint loaded as its config.json describes) the released MobileNet-V5
    tower. Returns the checkpoint opened (None without `path`), for `gemma3n.loading.prepare`.

    A caller with images checks this before decoding them (the command does).
    """
    if model == DEMO or (path is None and model is None):
        raise LoadError(DEMO_IS_TEXT_ONLY + ' ({path})', {'path': PATH})
    if path is None:
        return None
    checkpoint = open_checkpoint(existing_checkpoint(path))
    released = _released_towers(checkpoint, model)
    if released is not None and released.vision is not None:
        return checkpoint
    if not has_vision_encoder(checkpoint):
        raise LoadError('{with_vision} needs a checkpoint with a vision encoder (SigLIP, or the '
                        'released MobileNet-V5 tower); {path} ({format} format) holds none',
                        {'with_vision': True}, path=checkpoint.path, format=checkpoint.format)
    return checkpoint


def check_audio(path: str | os.PathLike | Checkpoint | None,
                model: str | Gemma3nTransformer | TransformerConfig | None = None
                ) -> Checkpoint:
    """LoadError unless the checkpoint at `path` is a Hugging Face one whose config.json has the
    released audio tower that `with_audio=True` asks for (and `model` is left to it); returns
    the checkpoint opened, for `gemma3n.loading.prepare`."""
    if model == DEMO or path is None:
        raise LoadError('the demo model is text-only: {with_audio} needs a Gemma 3n checkpoint '
                        'with the audio tower ({path})', {'with_audio': True, 'path': PATH})
    checkpoint = open_checkpoint(existing_checkpoint(path))
    released = _released_towers(checkpoint, model)
    if released is None or released.audio is None:
        leave_out = (': the towers come with the model its config.json describes, leave '
                     '{model:name} out') if model is not None else ''
        raise LoadError('{with_audio} needs a Hugging Face Gemma 3n checkpoint whose config.json '
                        'has an audio_config (the released ones do); {path} has none' + leave_out,
                        {'with_audio': True, **({'model': model} if model is not None else {})},
                        path=checkpoint.path)
    return checkpoint


def _released_towers(checkpoint: Checkpoint, model: Any) -> TowersConfig | None:
    """The released towers the checkpoint's config.json describes, when the model is left to
    it; else None."""
    if model is not None or checkpoint.hf_config is None:
        return None
    return model_config_from_hf(checkpoint.path, checkpoint.hf_config).towers
