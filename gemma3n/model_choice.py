"""Which model a checkpoint loads into: the presets by name, the dtypes a model runs in, and the
model a checkpoint's config.json describes (or a given one checked against it).

`gemma3n.load` picks its model here; the command's `info` describes one without loading it.

Example:
    >>> name, module = checkpoint_model(open_checkpoint('gemma-3n-E4B-it'))
    >>> name, module.config.num_layers
    ('e4b', 35)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from gemma3n.checkpoints.hf_config import check_hf_config
from gemma3n.checkpoints.hf_towers import model_config_from_hf
from gemma3n.checkpoints.loader import Checkpoint
from gemma3n.checkpoints.safetensors_hf import CONFIG_FILE, config_file
from gemma3n.config import TransformerConfig
from gemma3n.load_error import LoadError
from gemma3n.loaded_model import CONFIG_JSON_MODEL, CUSTOM_MODEL, DEMO
from gemma3n.models import Gemma3n_E2B, Gemma3n_E4B, demo_config, e2b_config, e4b_config
from gemma3n.transformer import Gemma3nTransformer

MODEL_CLASSES = {'e4b': Gemma3n_E4B, 'e2b': Gemma3n_E2B}
PRESET_CONFIGS = {'e4b': e4b_config, 'e2b': e2b_config}
DEFAULT_CHECKPOINT_MODEL = 'e4b'       # a checkpoint without a config.json to say its size
DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
DEMO_DTYPE = 'float32'
CHECKPOINT_DTYPE = 'bfloat16'          # halves the weights' memory; checkpoints are stored in it
DEMO_IS_TEXT_ONLY = ('the demo model is text-only: images need a real checkpoint with a vision '
                     'encoder')


def default_dtype(name: str) -> str:
    """The dtype model `name` runs in unless told: float32 for the demo, else bfloat16."""
    return DEMO_DTYPE if name == DEMO else CHECKPOINT_DTYPE


def model_dtype(dtype: Any, default: str) -> Any:
    """`dtype` (None: `default`) as one of DTYPES; a LoadError names any other."""
    if dtype is None:
        dtype = default
    try:
        return DTYPES[jnp.dtype(dtype).name]
    except (TypeError, KeyError):
        raise LoadError('{dtype} is not a dtype the model runs in: use '
                        + ' or '.join(map(repr, DTYPES)), {'dtype': dtype}) from None


def build_model(name: str, *, dtype: Any, with_vision: bool,
                vocab_size: int | None = None) -> Gemma3nTransformer:
    """The module of model `name` ('e4b', 'e2b' or 'demo'; the demo needs the `vocab_size`),
    without weights (e.g. to describe it)."""
    if name == DEMO:
        if with_vision:
            raise ValueError(DEMO_IS_TEXT_ONLY)
        return Gemma3nTransformer(config=demo_config(vocab_size), text_only=True, dtype=dtype)
    # The presets' configs hold the vision encoder; text_only leaves it out of the module.
    return MODEL_CLASSES[name](text_only=not with_vision, dtype=dtype)


def preset_name(config: TransformerConfig, default: str = CONFIG_JSON_MODEL) -> str:
    """The preset ('e4b', 'e2b') whose text-only config `config` is, else `default`."""
    return next((preset for preset, make_config in PRESET_CONFIGS.items()
                 if make_config(with_vision=False) == config), default)


def checkpoint_model(checkpoint: Checkpoint, model: Any = None, *, dtype: Any = None,
                     with_vision: bool = False, vocab_size: int | None = None,
                     towers: bool = True) -> tuple[str, Gemma3nTransformer]:
    """The model `checkpoint` loads into, and its name: `model` (as for `gemma3n.load`) when
    given, checked against a config.json, else the one config.json describes (with the released
    towers it describes unless not `towers`), else E4B. Only shapes are built: nothing is read
    but config.json (already, by `open_checkpoint`).

    `vocab_size`: the demo's (its tokenizer's), when `model` is 'demo'.
    """
    hf_config = checkpoint.hf_config
    if isinstance(model, (Gemma3nTransformer, TransformerConfig)):
        module = model if isinstance(model, Gemma3nTransformer) else Gemma3nTransformer(
            config=model, text_only=True)
        module = module.clone(dtype=model_dtype(dtype, jnp.dtype(module.dtype).name))
        name = preset_name(module.config, CUSTOM_MODEL)
        if with_vision and (module.text_only or module.config.vision_encoder is None):
            raise ValueError('with_vision=True needs a model with a vision encoder; the model '
                             'given has none (text_only=True or no vision_encoder in its config)')
    elif model is None and hf_config is not None:
        try:
            config = model_config_from_hf(checkpoint.path, hf_config)
        except ValueError as err:
            raise ValueError(f'{config_file(checkpoint.path)}: {err}') from err
        name = preset_name(dataclasses.replace(config, towers=None))
        # (prepare has refused with_vision without the released vision tower: Hugging Face
        # checkpoints hold no SigLIP encoder.)
        module = Gemma3nTransformer(config=config, text_only=not towers or config.towers is None,
                                    dtype=model_dtype(dtype, CHECKPOINT_DTYPE))
    else:
        name = model or DEFAULT_CHECKPOINT_MODEL
        module = build_model(name, dtype=model_dtype(dtype, default_dtype(name)),
                             with_vision=with_vision, vocab_size=vocab_size)
    problems = [] if hf_config is None else check_hf_config(hf_config, module.config)
    if problems:
        described = {'model': model} if isinstance(model, str) else {}
        raise LoadError(('{model}' if described else 'the model given') + ' does not fit '
                        '{config_path}: {problems}. Leave '
                        + ('{model:name}' if described else 'model') + ' out to load the model '
                        f'{CONFIG_FILE} describes', described,
                        config_path=config_file(checkpoint.path), problems='; '.join(problems))
    return name, module
