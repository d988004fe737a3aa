"""`gemma3n.load`: one call from a checkpoint (or none: the demo model) to a model ready to run.

Loading is two steps, so that every mistake is reported before any weight is read:
`prepare(path, ...)` checks the arguments, recognises the checkpoint (its format detected and
its config.json parsed once, `gemma3n.checkpoints.open_checkpoint`), picks the model config,
finds the tokenizer and checks that the weights fit the memory; `LoadPlan.load()` then reads
the weights straight into the serving layout (`gemma3n.layout`), leaving the per-layer table in
the file to be read row by row where the format allows. `load(...)` is both steps.

Example:
    >>> loaded = gemma3n.load('gemma-3n-E4B-it', quantize='int8')
    >>> loaded.sampler(cache_length=4096).sample('Why is the sky blue?')
    >>> loaded.apply(jnp.array([[2, 651, 1234]])).logits          # [1, 3, V]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gemma3n import memory
from gemma3n.checkpoints import load_params, open_per_layer_table
from gemma3n.checkpoints.hf_config import hf_final_logit_softcap
from gemma3n.checkpoints.loader import (ORBAX_FORMAT, SERVING_FORMAT, Checkpoint, existing_checkpoint,
                                       open_checkpoint)
from gemma3n.checkpoints.safetensors_hf import CONFIG_FILE, HFSoftcapWarning, config_file
from gemma3n.config import TransformerConfig
from gemma3n.converted import check_representation, load_converted
from gemma3n.layout import load_serving, serving_nbytes, to_serving
from gemma3n.load_error import PATH, LoadError
from gemma3n.loaded_model import DEMO, MODEL_NAMES, LoadedModel
from gemma3n.model_choice import DEMO_DTYPE, MODEL_CLASSES, build_model, checkpoint_model, model_dtype
from gemma3n.models import DEMO_SEED
from gemma3n.schema import model_schema
from gemma3n.sharding import ShardingRules, shard_params
from gemma3n.text import special_tokens
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
from gemma3n.tower_checks import check_audio, check_vision
from gemma3n.transformer import Gemma3nTransformer

QUANTIZE_FORMATS = ('int8', 'int4')
TOKENIZER_FILE = 'tokenizer.model'
USE_INT8 = "quantize='int8'"           # the memory error's advice, as Python spells it

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadPlan:
    """What `load` will do, every argument checked: `load()` does it.

    Attributes:
        name: the model's name, a key of `gemma3n.loaded_model.MODEL_NAMES`.
        model: the module the weights load into (checkpoint layout).
        tokenizer: the tokenizer (already read: the demo's size depends on it); None: none
            was asked for (token ids only).
        checkpoint: the checkpoint recognised; None: the demo's random weights.
        quantize: None, 'int8' or 'int4'.
        weights_nbytes: the bytes the loaded weights will hold.
        unused_softcap: the final logit softcap the checkpoint's config.json asks for that the
            model does not apply (None: none; see `hf_softcap`).
    """
    name: str
    model: Gemma3nTransformer
    tokenizer: Tokenizer | None
    checkpoint: Checkpoint | None
    quantize: str | None
    weights_nbytes: int
    unused_softcap: float | None = None

    @property
    def per_layer_table_in_file(self) -> bool:
        """Whether the per-layer table stays in the checkpoint file, read row by row (Orbax
        checkpoints and the demo hold it in memory)."""
        return self.checkpoint is not None and self.checkpoint.format != ORBAX_FORMAT

    def load(self, *, progress: bool = True, mesh: Mesh | None = None,
             sharding_rules: ShardingRules = ShardingRules()) -> LoadedModel:
        """The weights read (a checkpoint's, or the demo's random ones) into a LoadedModel.

        `progress`: show a progress bar while a checkpoint is read. `mesh`: place every weight
        in its shards on this device mesh (`gemma3n.sharding`), straight from the checkpoint,
        as `sharding_rules` say; the LoadedModel's sampler and chat then run on it.
        """
        start = time.perf_counter()
        dtype = self.model.dtype
        if self.checkpoint is None:
            model, params = self.model, demo_params(self.model)
            if self.quantize:
                model, params = to_serving(model, params, quantize_int8=self.quantize == 'int8',
                                           quantize_int4=self.quantize == 'int4', consume=True)
            if mesh is not None:
                params = shard_params(params, model_schema(model), mesh, sharding_rules)
            logger.info('random demo weights made in %.2f s (compilation included)',
                        time.perf_counter() - start)
            return LoadedModel(self.name, model, params, self.tokenizer, quantize=self.quantize)
        converted = self.checkpoint.format == SERVING_FORMAT
        if converted and mesh is not None:
            raise ValueError(f'{self.checkpoint.path} is a converted checkpoint, which loads on '
                             'one device: give the original checkpoint to load it on a mesh.')
        table = None
        if self.per_layer_table_in_file:
            table = open_per_layer_table(self.checkpoint, model=self.model, dtype=dtype)
        try:
            with warnings.catch_warnings():
                # prepare() warned already, naming load's own remedy (hf_softcap=True).
                warnings.simplefilter('ignore', HFSoftcapWarning)
                if converted:
                    model = self.model
                    params = load_converted(self.checkpoint, model, self.quantize)
                else:
                    model, params = load_serving(
                        self.checkpoint, self.model, dtype=dtype, progress=progress,
                        quantize_int8=self.quantize == 'int8',
                        quantize_int4=self.quantize == 'int4',
                        skip_per_layer_table=table is not None, mesh=mesh,
                        sharding_rules=sharding_rules)
        except BaseException:
            if table is not None:
                table.close()
            raise
        logger.info('checkpoint %s loaded in %.2f s', self.checkpoint.path,
                    time.perf_counter() - start)
        return LoadedModel(self.name, model, params, self.tokenizer, per_layer_table=table,
                           checkpoint=self.checkpoint, quantize=self.quantize)

    def tree(self, *, dtype: Any = 'model', progress: bool = True) -> dict[str, Any]:
        """The weights as a plain parameter tree in the checkpoint layout, the per-layer table
        included and `quantize` not applied: the demo's random ones, or `load_params` of the
        checkpoint (what `gemma3n export` writes and `gemma3n finetune` starts from).

        `dtype`: of a checkpoint's leaves; 'model': the model's, None: as stored.
        """
        if self.checkpoint is None:
            return demo_params(self.model)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', HFSoftcapWarning)     # as in load()
            return load_params(self.checkpoint, model=self.model, progress=progress,
                               dtype=self.model.dtype if dtype == 'model' else dtype)


def demo_params(model: Gemma3nTransformer) -> Any:
    """Random weights of the demo `model` (the same every time: seed DEMO_SEED)."""
    tokens = jnp.full((1, 1), special_tokens.BOS, jnp.int32)
    return jax.jit(model.init)(jax.random.key(DEMO_SEED), tokens)['params']


def load(path: str | os.PathLike | Checkpoint | None = None, *, progress: bool = True,
         mesh: Mesh | None = None, sharding_rules: ShardingRules = ShardingRules(),
         **options: Any) -> LoadedModel:
    """A Gemma 3n model, its weights and its tokenizer, ready to run: `prepare` then
    `LoadPlan.load`.

    Args:
        path: a Hugging Face checkpoint (directory or `.safetensors` file), an Orbax checkpoint
            directory, a file written by `save_params` or a folder of ours (fine-tuned, or
            converted by `gemma3n convert`: loaded as stored, by mapping its file); None: the built-in demo model (the
            Gemma 3n architecture at a small size, random weights, the packaged tokenizer).
        progress: show a progress bar while the checkpoint is read.
        mesh: a `jax.sharding.Mesh` (`gemma3n.sharding.make_mesh('data=2,tensor=4')`): every
            weight goes straight into its shards on it, and `.sampler`/`.chat` run on it.
        sharding_rules: which mesh axes split which logical axes (`gemma3n.sharding.ShardingRules`;
            default: the rules of docs/architecture.md §14).
        options: `prepare`'s keywords: model, dtype, quantize, tokenizer, with_vision,
            with_audio, towers, hf_softcap.

    Every check (a missing path or tokenizer, an unknown format, a config.json that does not
    fit `model`, weights larger than the memory) raises before any weight is read.

    Example:
        >>> loaded = gemma3n.load()                         # the demo model
        >>> loaded.chat().chat('Hello!')
    """
    return prepare(path, **options).load(progress=progress, mesh=mesh,
                                         sharding_rules=sharding_rules)


def prepare(
        path: str | os.PathLike | Checkpoint | None = None,
        *,
        model: str | Gemma3nTransformer | TransformerConfig | None = None,
        dtype: Any = None,
        quantize: str | None = None,
        tokenizer: str | os.PathLike | Tokenizer | bool | None = None,
        with_vision: bool = False,
        with_audio: bool = False,
        towers: bool = True,
        hf_softcap: bool = False,
) -> LoadPlan:
    """Checks `load`'s arguments and plans the load; nothing heavy is read.

    Args:
        path: as for `load`, or a `Checkpoint` already opened (`check_vision` returns one).
        model: 'e4b', 'e2b' or 'demo', a `Gemma3nTransformer` or a `TransformerConfig`
            (text-only); None: the demo without `path`, else the size a Hugging Face
            config.json describes, else E4B. A config.json that does not fit is refused.
        dtype: of the weights and computation ('bfloat16', 'float32' or a dtype); None: a given
            module's own, else float32 for the demo and bfloat16 for a checkpoint.
        quantize: 'int8' stores the large weights as int8 with one scale per output channel,
            'int4' in int4 groups of 32 with a float16 scale each.
        tokenizer: a `Tokenizer` or the path of a `tokenizer.model`; None: the one beside the
            checkpoint (the packaged one for the demo); False: none (token ids only, as in
            `Sampler.sample_tokens`; not for the demo, whose vocabulary is its tokenizer's).
        with_vision: load the vision encoder too (a checkpoint holding SigLIP, or a Hugging
            Face one whose config.json describes the released MobileNet-V5 tower).
        with_audio: the model must take audio (a Hugging Face checkpoint whose config.json
            describes the released audio tower).
        towers: load the released towers (MobileNet-V5, audio) that a Hugging Face
            config.json describes, with their embedders, when `model` is left to it; False:
            text only, unless `with_vision` or `with_audio` asks for them.
        hf_softcap: cap the final logits at the value config.json asks for, as transformers
            does (the reference does not cap: only sampled answers differ).
    """
    if quantize is not None and quantize not in QUANTIZE_FORMATS:
        raise LoadError('{quantize} is not a quantization format: use None or '
                        f'{", ".join(map(repr, QUANTIZE_FORMATS))}', {'quantize': quantize})
    if isinstance(model, str) and model not in (*MODEL_CLASSES, DEMO):
        raise LoadError('{model} is no model name: use ' + ', '.join(map(repr, (*MODEL_CLASSES, DEMO)))
                        + ', a Gemma3nTransformer or a TransformerConfig', {'model': model})
    if not isinstance(model, (str, Gemma3nTransformer, TransformerConfig, type(None))):
        raise TypeError(f'model must be a name, a Gemma3nTransformer or a TransformerConfig, '
                        f'got {type(model).__name__}.')
    # The vision encoder first: it needs the checkpoint's headers only.
    source = check_vision(path, model) if with_vision else None
    if with_audio:
        source = check_audio(source or path, model)
    if path is not None:
        source = source or existing_checkpoint(path)
    if source is None and model not in (None, DEMO):
        if not isinstance(model, str):
            raise ValueError('a model module or config needs a checkpoint path: only the demo '
                             'model runs with random weights')
        raise LoadError('{model} needs {path}: only the demo model runs with random weights',
                        {'model': model, 'path': PATH})
    if tokenizer is False and (source is None or model == DEMO):
        raise LoadError('the demo model takes its vocabulary from its tokenizer: leave '
                        '{tokenizer:name} out', {'tokenizer': False})
    tokenizer = None if tokenizer is False else _tokenizer(tokenizer, source)
    if tokenizer is not None:
        logger.info('tokenizer: %s (%d pieces)', tokenizer.path, tokenizer.vocab_size)
    if source is None:
        if hf_softcap:
            raise LoadError('{hf_softcap} applies the softcap of a Hugging Face checkpoint: give '
                            'one with {path}', {'hf_softcap': True, 'path': PATH})
        module = build_model(DEMO, dtype=model_dtype(dtype, DEMO_DTYPE), with_vision=False,
                             vocab_size=tokenizer.vocab_size)
        return _plan(DEMO, module, tokenizer, None, quantize)

    checkpoint = open_checkpoint(source)
    if checkpoint.format == SERVING_FORMAT:      # loaded as it was converted
        dtype, quantize = check_representation(checkpoint, dtype, quantize)
    name, module = checkpoint_model(checkpoint, model, dtype=dtype, with_vision=with_vision,
                                    vocab_size=None if tokenizer is None else tokenizer.vocab_size,
                                    towers=towers or with_vision or with_audio)
    cap = None if checkpoint.hf_config is None else hf_final_logit_softcap(
        checkpoint.hf_config)
    if hf_softcap:
        if checkpoint.hf_config is None:
            raise LoadError('{hf_softcap} takes the softcap from the ' + CONFIG_FILE + ' of a '
                            'Hugging Face checkpoint, and {path} has none', {'hf_softcap': True},
                            path=checkpoint.path)
        module = module.clone(config=dataclasses.replace(module.config, final_logit_softcap=cap))
    unused_softcap = cap if cap != module.config.final_logit_softcap else None
    if unused_softcap is not None:
        warnings.warn(f'{config_file(checkpoint.path)} caps the final logits at {cap}; like '
                      'Google\'s reference implementation this model does not (only sampled '
                      'answers differ from transformers\'): pass hf_softcap=True to cap them.',
                      HFSoftcapWarning, stacklevel=3)
    return _plan(name, module, tokenizer, checkpoint, quantize, unused_softcap)


def _plan(name: str, module: Gemma3nTransformer, tokenizer: Tokenizer | None,
          checkpoint: Checkpoint | None, quantize: str | None,
          unused_softcap: float | None = None) -> LoadPlan:
    """The plan, once the weights are known to fit the memory."""
    table_in_memory = checkpoint is None or checkpoint.format == ORBAX_FORMAT
    need = serving_nbytes(module, module.dtype, quantize_int8=quantize == 'int8',
                          quantize_int4=quantize == 'int4',
                          per_layer_table=table_in_memory)
    memory.check_fits(f'the weights of {MODEL_NAMES[name]} in {jnp.dtype(module.dtype).name}'
                      f'{f" ({quantize})" if quantize else ""}', need, () if quantize else (USE_INT8,),
                      verb='use')
    return LoadPlan(name, module, tokenizer, checkpoint, quantize, need, unused_softcap)


def _tokenizer(tokenizer: Any, checkpoint: Path | Checkpoint | None) -> Tokenizer:
    """The tokenizer given (or its path), else the one beside the checkpoint, else the demo's."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return Tokenizer(Path(tokenizer).expanduser())
    if checkpoint is None:
        return Tokenizer(default_tokenizer_path())
    if isinstance(checkpoint, Checkpoint):
        checkpoint = checkpoint.path
    directory = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if not (directory / TOKENIZER_FILE).is_file():
        raise LoadError(f'no {TOKENIZER_FILE} in {{directory}}: pass {{tokenizer}} (the Gemma 3n '
                        f'{TOKENIZER_FILE})', {'tokenizer': PATH}, directory=directory)
    return Tokenizer(directory / TOKENIZER_FILE)
