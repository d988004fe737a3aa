"""Images and audio clips of text prompts, for a model with the released towers.

- `encode_prompt`: a prompt's text with its `<start_of_image>` / `<start_of_audio>` markers ->
  token ids, each marker becoming the model's own marker id (`TowersConfig.image_ids.marker`,
  `.audio_ids.marker`; 255999 and 256000 in the released checkpoints), so a tokenizer needs no
  piece for them;
- `load_images`: image files or arrays -> uint8 `[N, S, S, 3]` resized as the processor does;
- `audio_input`: audio files or 16 kHz sample arrays -> the model's `AudioInput` (log-mel
  frames of every clip; bad audio raises `AudioInputError` naming it, a clip over 30 s warns
  with `AudioTruncatedWarning` and keeps its first 30 s).

Example:
    >>> ids = encode_prompt(tokenizer, '<start_of_audio>What is said?', towers, add_bos=True)
    >>> audio = audio_input([['speech.wav']])          # one prompt, one clip
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma3n.audio.audio_file import load_audio, prepare_audio
from gemma3n.audio.features import SAMPLE_RATE, log_mel_features
from gemma3n.text.special_tokens import BOS, START_OF_AUDIO_PIECE, START_OF_IMAGE_PIECE
from gemma3n.text.tokenizer import Tokenizer
from gemma3n.towers import AudioInput
from gemma3n.towers_config import TowersConfig
from gemma3n.vision.mobilenet.preprocess import resize_image

ClipLike = str | os.PathLike | np.ndarray | tuple[np.ndarray, int]
_MARKERS = re.compile(f'({re.escape(START_OF_IMAGE_PIECE)}|{re.escape(START_OF_AUDIO_PIECE)})')


def encode_prompt(tokenizer: Tokenizer, text: str, towers: TowersConfig, *,
                  add_bos: bool = False) -> list[int]:
    """Token ids of `text`, its markers as the model's marker ids (see the module docstring)."""
    ids = {START_OF_IMAGE_PIECE: towers.image_ids.marker,
           START_OF_AUDIO_PIECE: towers.audio_ids.marker}
    out = [BOS] if add_bos else []
    for part in _MARKERS.split(text):
        if part in ids:
            out.append(ids[part])
        elif part:
            out += tokenizer.encode(part)
    return out


def load_images(items: Sequence[Any], size: int) -> np.ndarray:
    """One prompt's images (paths, PIL images or uint8 arrays of any sizes) -> uint8
    [N, size, size, 3]."""
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    return np.stack([resize_image(item, size) for item in items])


def load_clip(item: ClipLike) -> np.ndarray:
    """An audio file, a (samples, sample_rate) pair, or samples at 16 kHz -> mono float32
    samples at 16 kHz."""
    if isinstance(item, (str, os.PathLike)):
        return load_audio(item)
    if isinstance(item, tuple):
        samples, rate = item
        return prepare_audio(samples, rate)
    return prepare_audio(item, SAMPLE_RATE)


def audio_input(clips: Sequence[Sequence[ClipLike]]) -> AudioInput:
    """One list of clips per prompt (all the same length) -> AudioInput [B, M, T, 128]."""
    counts = {len(items) for items in clips}
    if len(counts) != 1:
        raise ValueError(f'the prompts have {[len(items) for items in clips]} audio clips: every '
                         'prompt of a batch takes the same number.')
    loaded = [load_clip(item) for items in clips for item in items]
    mel, valid = log_mel_features(loaded)
    count = counts.pop()
    return AudioInput(mel.reshape((len(clips), count) + mel.shape[1:]),
                      valid.reshape(len(clips), count, -1))
