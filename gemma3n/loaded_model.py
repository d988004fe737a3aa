"""`LoadedModel`: a model with its weights and tokenizer, as `gemma3n.load` returns it.

It hides how the weights are held: the per-layer table may stay in the checkpoint file (rows
read for the tokens at hand), the weights may be re-laid out or int8. `apply`, `sampler` and
`chat` supply what that needs, so callers never see the split.

Example:
    >>> loaded = gemma3n.load()
    >>> loaded.apply(jnp.array([[2, 651]])).logits.shape           # (1, 2, V)
    >>> print(loaded.describe())
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n import multimodal
from gemma3n.checkpoints.loader import Checkpoint
from gemma3n.describe import describe_model
from gemma3n.embedder import per_layer_token_ids
from gemma3n.memory import format_bytes
from gemma3n.text.chat import ChatSampler
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH, Sampler
from gemma3n.text.tokenizer import Tokenizer
from gemma3n.transformer import Gemma3nTransformer, Output

DEMO = 'demo'
CONFIG_JSON_MODEL = 'config.json'      # a checkpoint's own size, neither E4B nor E2B
CUSTOM_MODEL = 'custom'                # a model module or config given by the caller
MODEL_NAMES = {'e4b': 'Gemma 3n E4B', 'e2b': 'Gemma 3n E2B',
               DEMO: 'the built-in demo model (Gemma 3n architecture, small, random weights)',
               CONFIG_JSON_MODEL: 'the Gemma 3n model its config.json describes',
               CUSTOM_MODEL: 'a Gemma 3n model of the config given'}


@dataclasses.dataclass(repr=False, eq=False)
class LoadedModel:
    """A model ready to run: module, weights, tokenizer and where the per-layer table is.

    Attributes:
        name: a key of MODEL_NAMES ('e4b', 'e2b', 'demo', ...).
        model: the module that reads `params` (in the serving layout when loaded from a
            checkpoint, see gemma3n.layout).
        params: the weights.
        tokenizer: the tokenizer; None: token ids only.
        per_layer_table: `table[ids] -> rows` read lazily from the checkpoint; None: the table
            is inside `params`.
        checkpoint: where the weights came from; None: the demo's random weights.
        quantize: None, 'int8' or 'int4'.

    Close it (or use it as a context manager) to release a lazily read table's file.
    """
    name: str
    model: Gemma3nTransformer
    params: Any
    tokenizer: Tokenizer | None
    per_layer_table: Any = None
    checkpoint: Checkpoint | None = None
    quantize: str | None = None

    @property
    def config(self) -> Any:
        """The model's `TransformerConfig`."""
        return self.model.config

    @property
    def is_demo(self) -> bool:
        return self.name == DEMO

    @property
    def title(self) -> str:
        return MODEL_NAMES[self.name]

    @property
    def weights_nbytes(self) -> int:
        """Bytes the weights hold in memory (a lazily read per-layer table not included)."""
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self.params))

    def per_layer_rows(self, tokens: Any, images: Any = None, audio: Any = None
                       ) -> np.ndarray | None:
        """Rows [*B, L', num_layers, P] of the lazily read per-layer table for tokens [*B, L]
        (L': the length once `images` and `audio` expand their markers); None when params hold
        the table."""
        if self.per_layer_table is None:
            return None
        tokens = np.asarray(tokens)
        kinds = []
        if images is not None and self.model.has_vision:
            images = np.asarray(images)
            ids, num_soft = multimodal.image_block(self.config)
            kinds.append((1 if images.ndim == 4 else images.shape[1], num_soft, ids))
        if audio is not None and self.model.has_audio:
            ids, num_soft = multimodal.audio_block(self.config)
            kinds.append((audio.num_clips, num_soft, ids))
        if kinds:
            flat = jnp.asarray(tokens.reshape(-1, tokens.shape[-1]))
            expanded, _, _ = multimodal.expand_blocks(flat, kinds)
            tokens = np.asarray(expanded).reshape(*tokens.shape[:-1], -1)
        return self.per_layer_table[per_layer_token_ids(tokens, self.config.num_embed)]

    def apply(self, tokens: Any, **kwargs: Any) -> Output:
        """The model's forward pass on tokens [*B, L]: `model.apply({'params': params}, tokens,
        **kwargs)` with the per-layer table's rows supplied when it is read lazily.

        Takes the keyword arguments of `Gemma3nTransformer.__call__` (images, cache,
        return_last_only, ...).
        """
        if self.per_layer_table is not None and kwargs.get('per_layer_embeddings') is None:
            kwargs['per_layer_embeddings'] = self.per_layer_rows(tokens, kwargs.get('images'),
                                                                 kwargs.get('audio'))
        return self.model.apply({'params': self.params}, jnp.asarray(tokens), **kwargs)

    def sampler(self, **kwargs: Any) -> Sampler:
        """A `Sampler` of this model (keyword arguments: those of `Sampler`, such as sampling,
        cache_length, max_out_length)."""
        return Sampler(model=self.model, params=self.params, tokenizer=self.tokenizer,
                       per_layer_table=self.per_layer_table, **kwargs)

    def chat(self, **kwargs: Any) -> ChatSampler:
        """A `ChatSampler` (a conversation) with this model (keyword arguments: those of
        `ChatSampler`)."""
        return ChatSampler(model=self.model, params=self.params, tokenizer=self.tokenizer,
                           per_layer_table=self.per_layer_table, **kwargs)

    def _source(self) -> str:
        if self.checkpoint is None:
            return 'random weights (no checkpoint)'
        return f'{self.checkpoint.path} ({self.checkpoint.format} format)'

    def _weights(self) -> str:
        dtype = jnp.dtype(self.model.dtype).name
        return f'{dtype}{f", {self.quantize} large weights" if self.quantize else ""}'

    def _table(self) -> str:
        if self.per_layer_table is None:
            return 'in memory'
        return f'read row by row from {self.per_layer_table.file}'

    def _tokenizer(self) -> str:
        if self.tokenizer is None:
            return 'none (token ids only)'
        return f'{self.tokenizer.path} ({self.tokenizer.vocab_size:,} pieces)'

    def describe(self, cache_length: int = DEFAULT_CACHE_LENGTH) -> str:
        """A text summary: where the weights came from and how they are held, then the
        architecture, parameter counts and memory (`gemma3n.describe.describe_model`)."""
        loaded = [
            f'loaded: {self._source()}',
            f'  weights {self._weights()}: {format_bytes(self.weights_nbytes)} in memory',
            f'  per-layer table {self._table()}',
            f'  tokenizer {self._tokenizer()}',
            '',
        ]
        return '\n'.join(loaded) + describe_model(self.model, self.title,
                                                  jnp.dtype(self.model.dtype).name, cache_length)

    def close(self) -> None:
        """Releases the file of a lazily read per-layer table (nothing else holds one)."""
        if self.per_layer_table is not None:
            self.per_layer_table.close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        cfg = self.config
        return (f'LoadedModel({self.name!r}: {cfg.num_layers} layers, width {cfg.embed_dim}, '
                f'vocabulary {cfg.num_embed:,}; {self._source()}; weights {self._weights()}, '
                f'{format_bytes(self.weights_nbytes)}; per-layer table {self._table()}; '
                f'tokenizer {self._tokenizer()})')
