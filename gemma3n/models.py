"""Presets: the published Gemma 3n sizes as ready-to-use modules."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from gemma3n.config import (E2B_NUM_LAYERS, E2B_SHARED_LAYERS, E4B_NUM_LAYERS, E4B_SHARED_LAYERS,
                            TransformerConfig)
from gemma3n.transformer import Gemma3nTransformer, ModelInfo
from gemma3n.vision import SigLiPFromPatches

E4B_HIDDEN_DIM = 16384
E2B_HIDDEN_DIM = 8192


def e4b_config(with_vision: bool = True) -> TransformerConfig:
    return TransformerConfig.gemma3n(
        num_layers=E4B_NUM_LAYERS, hidden_dim=E4B_HIDDEN_DIM, num_shared_layers=E4B_SHARED_LAYERS,
        vision_encoder=SigLiPFromPatches() if with_vision else None)


def e2b_config(with_vision: bool = True) -> TransformerConfig:
    return TransformerConfig.gemma3n(
        num_layers=E2B_NUM_LAYERS, hidden_dim=E2B_HIDDEN_DIM, num_shared_layers=E2B_SHARED_LAYERS,
        vision_encoder=SigLiPFromPatches() if with_vision else None)


class Gemma3n_E4B(Gemma3nTransformer):  # pylint: disable=invalid-name
    """Gemma 3n E4B: 35 layers, width 2048, FFN 16384, 15 KV-shared layers.

    Example:
        >>> model = Gemma3n_E4B(text_only=True)
        >>> shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    """
    config: TransformerConfig = dataclasses.field(default_factory=e4b_config)
    INFO: ClassVar[ModelInfo] = ModelInfo(tokenizer_version='3n', default_ckpt=None)


class Gemma3n_E2B(Gemma3nTransformer):  # pylint: disable=invalid-name
    """Gemma 3n E2B: 30 layers, width 2048, FFN 8192, 10 KV-shared layers.

    Example:
        >>> model = Gemma3n_E2B(text_only=True)
    """
    config: TransformerConfig = dataclasses.field(default_factory=e2b_config)
    INFO: ClassVar[ModelInfo] = ModelInfo(tokenizer_version='3n', default_ckpt=None)


DEMO_SEED = 0


def demo_config(vocab_size: int) -> TransformerConfig:
    """A small model of the full Gemma 3n architecture (every mechanism, random weights).

    It runs in seconds on a laptop CPU and pairs with the tokenizer shipped in the package:
    what the command line uses when no checkpoint is given.
    """
    return TransformerConfig.gemma3n(
        num_layers=10, num_shared_layers=5, num_sparse_layers=2, embed_dim=128, hidden_dim=512,
        num_heads=4, num_kv_heads=2, head_dim=32, num_embed=vocab_size, per_layer_input_dim=16,
        laurel_rank=16, sliding_window_size=64)
