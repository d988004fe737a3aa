"""Building a Gemma 3n model by name, and its weights: a checkpoint's, or the demo's random ones.

The command (`gemma3n.cli`) turns its options into these calls.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gemma3n.checkpoints import open_per_layer_table
from gemma3n.checkpoints.loader import ORBAX_FORMAT, checkpoint_format
from gemma3n.config import TransformerConfig
from gemma3n.layout import load_serving
from gemma3n.models import (DEMO_SEED, Gemma3n_E2B, Gemma3n_E4B, demo_config, e2b_config,
                            e4b_config)
from gemma3n.schema import model_schema
from gemma3n.sharding import shard_params
from gemma3n.text import special_tokens
from gemma3n.text.tokenizer import Tokenizer
from gemma3n.transformer import Gemma3nTransformer

DEMO = 'demo'
MODEL_CLASSES = {'e4b': Gemma3n_E4B, 'e2b': Gemma3n_E2B}
CONFIG_JSON_MODEL = 'config.json'    # a checkpoint's own size, neither E4B nor E2B
PRESET_CONFIGS = {'e4b': e4b_config, 'e2b': e2b_config}
DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
TOKENIZER_FILE = 'tokenizer.model'
DEMO_IS_TEXT_ONLY = ('the demo model is text-only: images need a real checkpoint with a vision '
                     'encoder')


@dataclasses.dataclass
class LoadedModel:
    """A model ready to sample from.

    Example:
        >>> model = build_model('e4b', dtype=jnp.bfloat16, with_vision=False)
        >>> model, params, table = load_checkpoint(path, model, dtype=jnp.bfloat16)
        >>> loaded = LoadedModel('e4b', model, params, Tokenizer(path / TOKENIZER_FILE), table)
        >>> Sampler(model=loaded.model, params=loaded.params, tokenizer=loaded.tokenizer,
        ...         per_layer_table=loaded.per_layer_table)
    """
    name: str
    model: Gemma3nTransformer
    params: Any
    tokenizer: Tokenizer
    per_layer_table: Any = None      # read lazily from the checkpoint; None: inside params

    @property
    def is_demo(self) -> bool:
        return self.name == DEMO


def build_model(name: str, *, dtype: Any, with_vision: bool,
                vocab_size: int | None = None) -> Gemma3nTransformer:
    """The module of model `name` ('e4b', 'e2b' or 'demo'; the demo needs the `vocab_size`)."""
    if name == DEMO:
        if with_vision:
            raise ValueError(DEMO_IS_TEXT_ONLY)
        return Gemma3nTransformer(config=demo_config(vocab_size), text_only=True, dtype=dtype)
    # The presets' configs hold the vision encoder; text_only leaves it out of the module.
    return MODEL_CLASSES[name](text_only=not with_vision, dtype=dtype)


def preset_name(config: TransformerConfig) -> str:
    """The preset ('e4b', 'e2b') whose text-only config `config` is, else CONFIG_JSON_MODEL."""
    return next((preset for preset, make_config in PRESET_CONFIGS.items()
                 if make_config(with_vision=False) == config), CONFIG_JSON_MODEL)


def demo_params(model: Gemma3nTransformer) -> Any:
    """Random weights of the demo `model` (the same every time: seed DEMO_SEED)."""
    tokens = jnp.full((1, 1), special_tokens.BOS, jnp.int32)
    return jax.jit(model.init)(jax.random.key(DEMO_SEED), tokens)['params']


def load_checkpoint(checkpoint: Path, model: Gemma3nTransformer, *, dtype: Any,
                    quantize_int8: bool = False,
                    mesh: Any = None) -> tuple[Gemma3nTransformer, Any, Any]:
    """The weights of `checkpoint` for `model`: (serving model, params, per-layer table or None).

    The per-layer table stays in the file (rows are read per token) where the format allows
    (None: it is inside params); the weights are re-laid out for fast decoding (gemma3n.layout)
    one by one as they are read, straight onto the device, or into their shards on `mesh`.
    """
    table = None
    if checkpoint_format(checkpoint) != ORBAX_FORMAT:
        table = open_per_layer_table(checkpoint, model=model, dtype=dtype)
    model, params = load_serving(checkpoint, model, dtype=dtype, quantize_int8=quantize_int8,
                                 skip_per_layer_table=table is not None, mesh=mesh)
    return model, params, table


def shard_demo_params(model: Gemma3nTransformer, params: Any, mesh: Any) -> Any:
    """The demo's weights (in any layout) placed on `mesh` by the default rules."""
    return shard_params(params, model_schema(model), mesh)
