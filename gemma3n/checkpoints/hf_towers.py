"""The released towers of a Hugging Face Gemma 3n checkpoint: their config and their tensors.

`towers_config_from_hf` reads config.json's `vision_config`, `audio_config`,
`vision_soft_tokens_per_image`, `audio_soft_tokens_per_image` and the block token ids
(`boi/eoi/image_token_id`, `boa/eoa/audio_token_id`) into a `TowersConfig`, and the image size
from the processor's `preprocessor_config.json` when it is there. `read_towers` reads the towers'
tensors (`model.vision_tower.timm_model.*`, `model.embed_vision.*`, `model.audio_tower.*`,
`model.embed_audio.*`), each checked by name and shape, into the `towers` subtree of our params.

Example:
    >>> config = model_config_from_hf(Path('gemma-3n-E4B-it'))     # text decoder + towers
    >>> model = Gemma3nTransformer(config=config)
    >>> params = load_params('gemma-3n-E4B-it', model=model)        # params['towers'] included
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.audio.encoder import AudioEncoder
from gemma3n.checkpoints import hf_audio, hf_mobilenet
from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.checkpoints.hf_config import config_from_hf
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.config import TransformerConfig
from gemma3n.layers.weights import weight_schema
from gemma3n.multimodal import BlockIds
from gemma3n.towers import audio_embedder
from gemma3n.towers_config import TowersConfig
from gemma3n.validation import check_finite
from gemma3n.vision.mobilenet.config import MOBILENET_V5_300M

PREPROCESSOR_FILE = 'preprocessor_config.json'
TOWERS = 'towers'                # our params' subtree (`Gemma3nTransformer.towers`)
TOWER_PREFIXES = (hf_mobilenet.HF_VISION_TOWER_PREFIX, hf_mobilenet.HF_EMBED_VISION_PREFIX,
                  hf_audio.AUDIO_TOWER_PREFIX, hf_audio.EMBED_AUDIO_PREFIX)
# Our TowersConfig field <- config.json field (absent fields keep the released values).
_IMAGE_IDS = {'marker': 'boi_token_id', 'placeholder': 'image_token_id', 'end': 'eoi_token_id'}
_AUDIO_IDS = {'marker': 'boa_token_id', 'placeholder': 'audio_token_id', 'end': 'eoa_token_id'}


def _ids(hf_config: Mapping[str, Any], fields: Mapping[str, str], default: BlockIds) -> BlockIds:
    return BlockIds(**{ours: int(hf_config.get(theirs, getattr(default, ours)))
                       for ours, theirs in fields.items()})


def image_size_from_hf(directory: Path) -> int:
    """The square image size of the checkpoint's image processor (768 without its config)."""
    path = directory / PREPROCESSOR_FILE
    if not path.is_file():
        return MOBILENET_V5_300M.image_size
    try:
        size = json.loads(path.read_text()).get('size') or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f'{path} is not valid JSON: {err}') from err
    height = size.get('height', MOBILENET_V5_300M.image_size)
    width = size.get('width', height)
    if height != width:
        raise ValueError(f'{path}: images of {height}x{width}; the vision tower takes square ones.')
    return int(height)


def towers_config_from_hf(hf_config: Mapping[str, Any], image_size: int = 768
                          ) -> TowersConfig | None:
    """The towers a HF config.json describes; None for a text-only config (no
    vision_config / audio_config)."""
    hf_vision, hf_audio_config = hf_config.get('vision_config'), hf_config.get('audio_config')
    if hf_vision is None and hf_audio_config is None:
        return None
    defaults = TowersConfig()
    values: dict[str, Any] = dict(vision=None, audio=None)
    if hf_vision is not None:
        vision = hf_mobilenet.vision_config_from_hf(hf_vision, image_size)
        want = hf_config.get('vision_soft_tokens_per_image', vision.num_soft_tokens)
        if want != vision.num_soft_tokens:
            raise ValueError(f'vision_soft_tokens_per_image={want} but the vision tower makes '
                             f'{vision.num_soft_tokens} soft tokens per image.')
        values.update(
            vision=vision, image_ids=_ids(hf_config, _IMAGE_IDS, defaults.image_ids),
            vision_vocab_size=hf_vision.get('vocab_size', defaults.vision_vocab_size),
            vision_vocab_offset=hf_vision.get('vocab_offset', defaults.vision_vocab_offset),
            vision_embed_eps=hf_vision.get('rms_norm_eps', defaults.vision_embed_eps))
    if hf_audio_config is not None:
        values.update(
            audio=hf_audio.audio_config_from_hf(hf_audio_config),
            audio_ids=_ids(hf_config, _AUDIO_IDS, defaults.audio_ids),
            audio_soft_tokens=hf_config.get('audio_soft_tokens_per_image',
                                            defaults.audio_soft_tokens))
    return TowersConfig(**values)


def model_config_from_hf(path: Path, hf_config: Mapping[str, Any] | None = None
                         ) -> TransformerConfig:
    """The whole model a HF checkpoint directory (or file in it) describes: its text decoder
    (`hf_mapping.config_from_hf`) and its towers."""
    directory = path if path.is_dir() else path.parent
    if hf_config is None:
        hf_config = json.loads((directory / 'config.json').read_text())
    towers = towers_config_from_hf(hf_config, image_size_from_hf(directory))
    return dataclasses.replace(config_from_hf(hf_config), towers=towers)


def tower_schemas(towers: TowersConfig, text_width: int
                  ) -> list[tuple[str, str, Callable[..., dict[str, Any]]]]:
    """(our subtree name, HF prefix, reader(state, dtype)) of each part of `towers`."""
    parts = []
    if towers.vision is not None:
        vision = towers.vision
        parts.append(('vision_tower', hf_mobilenet.HF_VISION_TOWER_PREFIX,
                      lambda state, dtype: hf_mobilenet.vision_tower_from_hf(
                          state, vision, dtype=dtype)))
        parts.append(('embed_vision', hf_mobilenet.HF_EMBED_VISION_PREFIX,
                      lambda state, dtype: hf_mobilenet.embed_vision_from_hf(
                          state, vision, text_width, dtype=dtype,
                          vocab_size=towers.vision_vocab_size,
                          vocab_offset=towers.vision_vocab_offset,
                          eps=towers.vision_embed_eps)))
    if towers.audio is not None:
        audio = towers.audio
        frames = audio.time_stride * audio.reduction_factor
        mel = jax.ShapeDtypeStruct((1, frames, audio.input_feat_size), jnp.float32)
        valid = jax.ShapeDtypeStruct((1, frames), jnp.bool_)
        ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        soft = jax.ShapeDtypeStruct((1, 1, audio.hidden_size), jnp.float32)
        parts.append(('audio_tower', hf_audio.AUDIO_TOWER_PREFIX,
                      lambda state, dtype: hf_audio.params_from_hf(
                          state, weight_schema(AudioEncoder(audio), mel, valid),
                          prefix=hf_audio.AUDIO_TOWER_PREFIX, dtype=dtype)))
        parts.append(('embed_audio', hf_audio.EMBED_AUDIO_PREFIX,
                      lambda state, dtype: hf_audio.params_from_hf(
                          state, weight_schema(audio_embedder(audio, text_width), ids, soft),
                          prefix=hf_audio.EMBED_AUDIO_PREFIX, dtype=dtype)))
    return parts


def check_towers_config(path: Path, hf_config: Mapping[str, Any] | None,
                        towers: TowersConfig) -> None:
    """ValueError unless the checkpoint's config.json (when there is one) describes `towers`."""
    if hf_config is None:
        return
    directory = path if path.is_dir() else path.parent
    theirs = towers_config_from_hf(hf_config, image_size_from_hf(directory))
    if theirs != towers:
        fields = ([f.name for f in dataclasses.fields(TowersConfig)
                   if getattr(theirs, f.name) != getattr(towers, f.name)]
                  if theirs is not None else ['vision_config and audio_config (it has none)'])
        raise ValueError(f'{directory / "config.json"} describes other towers than the model: '
                         f'{", ".join(fields)} differ. Build the model from the checkpoint '
                         f'(model_config_from_hf) to use its towers.')


def read_towers(files: SafetensorsFiles, towers: TowersConfig, text_width: int, *,
                dtype: Any = None, progress: Callable[[int], Any] | None = None,
                transform: Callable[[str, Any], Any] | None = None) -> dict[str, Any]:
    """The `towers` params (float32 unless `dtype`) from a HF checkpoint's files, one part at
    a time; `progress(n)` is told how many values each part held; `transform(path, array)` as
    for the text weights. ValueError names every missing, unexpected or misshapen tensor of a
    part, and a tensor holding NaN or infinity."""
    params = {}
    dtype = np.float32 if dtype is None else dtype
    keys = list(files.keys())
    for name, prefix, read in tower_schemas(towers, text_width):
        state = {key: files.read(key) for key in keys if key.startswith(prefix)}
        if not state:
            raise ValueError(f'the model has {name} but the checkpoint holds no tensors under '
                             f'{prefix!r}.')
        for key, value in state.items():
            check_finite(f'Tensor {files.describe(key)}', value)
        flat = flatten_params(read(state, dtype))
        if transform is not None:
            flat = {path: transform(f'{TOWERS}/{name}/{path}', leaf) for path, leaf in flat.items()}
        params[name] = unflatten_params(flat)
        if progress is not None:
            progress(sum(int(np.size(value)) for value in state.values()))
    return params
