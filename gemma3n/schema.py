"""The weight schema of a Gemma 3n model: every parameter's path, shape, dtype and declaration.

Each weight is declared once, by the module that uses it (`gemma3n.layers.weights.declare`:
shape, initializer, logical axis names, the axes a projection reads and writes). `model_schema`
reads those declarations for a whole model from one `jax.eval_shape` of its `init` (no memory);
checkpoint validation, the Hugging Face mapping, the serving layout, sharding rules and LoRA
targets all read this one schema. See docs/architecture.md §6.

Example:
    >>> schema = model_schema(Gemma3n_E4B(text_only=True))
    >>> schema['layer_0/attn/q_einsum/w']
    WeightInfo(shape=(8, 2048, 256), dtype=dtype(bfloat16), axes=('q_heads', 'embed', 'head_dim'), in_axes=(1,), out_axes=(2,))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp

from gemma3n.config import TransformerConfig
from gemma3n.layers.weights import WeightInfo, weight_schema
from gemma3n.transformer import Gemma3nTransformer

# `init` needs tokens to trace; one token builds every weight.
SCHEMA_TOKENS_SHAPE = (1, 1)


def model_schema(model: Gemma3nTransformer) -> dict[str, WeightInfo]:
    """{'/'-joined path: WeightInfo} of every parameter of `model` in the checkpoint layout."""
    if model.text_only or model.config.vision_encoder is None:
        return dict(text_schema(model.config, model.dtype))
    return weight_schema(model, jnp.ones(SCHEMA_TOKENS_SHAPE, jnp.int32))


def text_schema(config: TransformerConfig, dtype: Any = jnp.bfloat16) -> dict[str, WeightInfo]:
    """The schema of the text decoder of `config` (no vision parameters), in `dtype`."""
    return dict(_text_schema(dataclasses.replace(config, vision_encoder=None), jnp.dtype(dtype)))


@functools.lru_cache(maxsize=16)
def _text_schema(config: TransformerConfig, dtype: Any) -> dict[str, WeightInfo]:
    # Cached: loaders, the HF mapping and the serving layout ask for the same config repeatedly,
    # and tracing a full-size init takes a few seconds.
    model = Gemma3nTransformer(config=config, text_only=True, dtype=dtype)
    return weight_schema(model, jnp.ones(SCHEMA_TOKENS_SHAPE, jnp.int32))
