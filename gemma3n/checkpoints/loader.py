"""`load_params`: recognise a checkpoint's format and return our parameter tree.

Formats: a Hugging Face Gemma 3n directory or `.safetensors` file (`safetensors_hf`), a reference
Orbax PyTree checkpoint directory (`orbax_io`), our own safetensors format (`native`). Every
failure raises before anything is returned (no partial trees). No format has a checksum of the
values, so every array is checked for NaN/Inf as it is read (`gemma3n.validation.check_finite`,
one pass over memory the read just wrote).

Example:
    >>> model = Gemma3n_E4B(text_only=True)
    >>> params = load_params('/ckpts/gemma-3n-E4B-it', model=model, dtype=jnp.bfloat16)
    >>> out = model.apply({'params': params}, tokens)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from gemma3n.checkpoints import hf_mapping
from gemma3n.checkpoints.flat_params import unflatten_params
from gemma3n.checkpoints.native import FOLDER_PARAMS_FILE, is_native, native_catalog, native_read
from gemma3n.checkpoints.orbax_io import ORBAX_MARKERS, is_orbax_checkpoint, orbax_catalog, orbax_restore
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.checkpoints.serving_file import SERVING_FILE, is_serving_file
from gemma3n.checkpoints.safetensors_hf import (INDEX_FILE, SINGLE_FILE, is_hf_directory, load_hf_params,
                                               read_hf_config)
from gemma3n.config import TransformerConfig
from gemma3n.embedder import PER_LAYER_TABLE_PATH
from gemma3n.schema import text_schema
from gemma3n.validation import check_finite

# Parameters of the vision path (docs/architecture.md §5); a text-only model has none of them.
SIGLIP_PREFIXES = ('vision_encoder/', 'embedder/mm_')
# The released towers (MobileNet-V5, audio) and their embedders: `Gemma3nTransformer.towers`.
TOWERS_PREFIX = 'towers/'
VISION_PREFIXES = SIGLIP_PREFIXES + (TOWERS_PREFIX,)
# What `checkpoint_format` recognises.
HF_FORMAT, ORBAX_FORMAT, NATIVE_FORMAT = 'Hugging Face', 'Orbax', 'gemma3n native'
SERVING_FORMAT = 'gemma3n serving'           # converted by `gemma3n convert` (serving_file.py)
# The weights file of a checkpoint folder of ours, which loaders take for the folder.
FOLDER_FILES = (FOLDER_PARAMS_FILE, SERVING_FILE)
# What to do with a checkpoint that lacks the SigLIP encoder a model asks for, for users of the
# command line and of Python alike.
WITHOUT_SIGLIP_ADVICE = ('On the command line, --image needs a checkpoint that has the SigLIP '
                         'vision encoder (a reference Orbax checkpoint, or our own format saved '
                         'from one); without --image this checkpoint serves text. From Python, '
                         'load it into a model without a vision encoder, e.g. '
                         'Gemma3n_E4B(text_only=True).')

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint recognised once: where it is, its format and, for Hugging Face, its config.json.

    Every loader takes one wherever it takes a path, so a caller that opens a checkpoint once
    (`gemma3n.load`) has its format detected and its config.json parsed once, however many
    loaders read it.

    Example:
        >>> checkpoint = open_checkpoint('gemma-3n-E4B-it')
        >>> checkpoint.format, checkpoint.hf_config['text_config']['num_hidden_layers']
        ('Hugging Face', 35)
    """
    path: Path
    format: str                  # HF_FORMAT, ORBAX_FORMAT, NATIVE_FORMAT or SERVING_FORMAT
    # config.json beside a Hugging Face checkpoint or in a checkpoint folder of ours (None: none)
    hf_config: dict[str, Any] | None = None


def open_checkpoint(path: str | os.PathLike | Checkpoint) -> Checkpoint:
    """The checkpoint at `path` recognised (a `Checkpoint` is returned as it is); raises
    FileNotFoundError / ValueError naming `path` when there is none or its format is unknown."""
    if isinstance(path, Checkpoint):
        return path
    path = folder_file(Path(path).expanduser())
    checkpoint = checkpoint_format(path)
    # A checkpoint folder of ours (what fine-tuning and `convert` write) has a config.json too.
    hf_config = read_hf_config(path) if checkpoint != ORBAX_FORMAT else None
    return Checkpoint(path, checkpoint, hf_config)


def existing_checkpoint(path: str | os.PathLike | Checkpoint) -> Path | Checkpoint:
    """`path` as a Path, FileNotFoundError unless something is there (a `Checkpoint` is returned
    as it is): the first check of a path a caller gives, before its format is looked at."""
    if isinstance(path, Checkpoint):
        return path
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    return path


def load_params(
        path: str | os.PathLike | Checkpoint,
        *,
        model: Any = None,
        dtype: Any = None,
        progress: bool = True,
        skip_per_layer_table: bool = False,
        transform: hf_mapping.Transform | None = None,
) -> dict[str, Any]:
    """Our nested parameter tree (np.ndarray leaves) from the checkpoint at `path`.

    Args:
        path: HF directory / `.safetensors` file, Orbax checkpoint directory, or a file written by
            `save_params`; or a `Checkpoint` already opened.
        model: a `Gemma3nTransformer` (its `config` and `text_only` are used: it has tower parameters
            unless `text_only=True` or its config has neither `vision_encoder` (SigLIP) nor `towers`
            (the released MobileNet-V5 and audio towers, read from HF checkpoints under `towers/`))
            or a `TransformerConfig` (text-only). Needed for HF files without a config.json beside them; when given, every
            kept tensor's path, shape and dtype are checked against it. None: HF checkpoints derive
            the config from config.json, other formats are returned as stored.
        dtype: target dtype of every leaf (e.g. `jnp.bfloat16`); None keeps the stored dtypes.
        progress: show a tqdm progress bar.
        skip_per_layer_table: leave `embedder/per_layer_input_embedding` (E4B: 4.7 GB in bfloat16) out
            of the result without reading it; generation can gather its rows from the file instead
            (`open_per_layer_table`). Checked against a model, the checkpoint must still hold it.
        transform: `transform(path, array)` converts each parameter right after it is read, before
            the next one is (largest first), and its result is stored in the tree: e.g.
            `gemma3n.layout.ServingConverter` re-lays out and quantizes while loading, so memory
            never holds the checkpoint's layout of the whole model. Orbax checkpoints are restored
            whole first, then converted leaf by leaf.
    """
    opened = open_checkpoint(path)
    path, checkpoint = opened.path, opened.format
    config, text_only = model_config(model)
    dtype = None if dtype is None else np.dtype(dtype)
    skip = {PER_LAYER_TABLE_PATH} if skip_per_layer_table else set()

    if checkpoint == SERVING_FORMAT:
        raise ValueError(f'{path} is a converted checkpoint (`gemma3n convert`): it holds the '
                         'serving layout, which gemma3n.load and the commands that generate run; '
                         'the checkpoint layout (export, finetune) needs the original checkpoint.')
    if checkpoint == HF_FORMAT:
        if not text_only and config.vision_encoder is not None:
            raise ValueError(f'{path}: Hugging Face Gemma 3n checkpoints hold no SigLIP vision encoder (their '
                             f'vision tower is MobileNet-V5, a different network). {WITHOUT_SIGLIP_ADVICE}')
        return load_hf_params(path, config=config, hf_config=opened.hf_config, dtype=dtype,
                              progress=progress, skip=skip, transform=transform,
                              towers=None if text_only else config.towers)
    if checkpoint == ORBAX_FORMAT:
        names = _select(orbax_catalog(path), config, text_only, path, skip)
        flat = orbax_restore(path, names, dtype)
        for name in sorted(flat, key=lambda n: -flat[n].size):
            check_finite(f'Array {name} of {path}', flat[name])
            if transform is not None:
                flat[name] = transform(name, flat.pop(name))
        return unflatten_params(flat)
    files = SafetensorsFiles([path])
    catalog = native_catalog(files)
    names = _select(catalog, config, text_only, path, skip)
    sizes = {name: math.prod(catalog[name][0]) for name in names}
    with tqdm.tqdm(total=sum(sizes.values()), desc=f'Loading {path.name}', unit='param', unit_scale=True,
                   disable=not progress) as bar:
        largest_first = sorted(names, key=lambda n: -sizes[n])
        return unflatten_params(native_read(files, largest_first, dtype, bar.update, transform))


def folder_file(path: Path) -> Path:
    """The weights file of checkpoint folder `path` of ours (FOLDER_FILES); any other path as it is."""
    return next((path / name for name in FOLDER_FILES if (path / name).is_file()), path)


def checkpoint_format(path: Path) -> str:
    """HF_FORMAT, ORBAX_FORMAT, NATIVE_FORMAT or SERVING_FORMAT; FileNotFoundError / ValueError
    naming `path` otherwise."""
    path = folder_file(path)
    if not path.exists():
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    if path.is_dir():
        if is_hf_directory(path):
            return HF_FORMAT
        if is_orbax_checkpoint(path):
            return ORBAX_FORMAT
        found = sorted(p.name for p in path.iterdir())
        raise ValueError(f'{path} is not a recognised checkpoint directory: expected {INDEX_FILE} or '
                         f'{SINGLE_FILE} (Hugging Face) or Orbax files ({", ".join(ORBAX_MARKERS)}); '
                         f'it holds {found[:10]}{" ..." if len(found) > 10 else ""}.')
    files = SafetensorsFiles([path])
    if is_serving_file(files, path):
        return SERVING_FORMAT
    return NATIVE_FORMAT if is_native(files, path) else HF_FORMAT


def has_vision_encoder(path: str | os.PathLike | Checkpoint) -> bool:
    """Whether the checkpoint at `path` holds vision encoder parameters, from its headers alone
    (nothing is read). Hugging Face checkpoints never do (their vision tower is not SigLIP)."""
    checkpoint = open_checkpoint(path)
    if checkpoint.format == HF_FORMAT:
        return False
    path = checkpoint.path
    names = orbax_catalog(path) if checkpoint.format == ORBAX_FORMAT else SafetensorsFiles([path]).keys()
    return any(name.startswith(SIGLIP_PREFIXES) for name in names)


def model_config(model: Any) -> tuple[TransformerConfig | None, bool]:
    """(config, text_only) of a `model` argument: a Gemma3nTransformer, a TransformerConfig or None.

    text_only: the model has no tower parameters (`text_only=True`, or neither a vision encoder nor
    the released towers in its config).
    """
    if model is None:
        return None, True
    if isinstance(model, TransformerConfig):
        return model, True
    config = getattr(model, 'config', None)
    if not isinstance(config, TransformerConfig):
        raise TypeError(f'model must be a Gemma3nTransformer or a TransformerConfig, got {type(model).__name__}.')
    return config, bool(getattr(model, 'text_only', False)) or (
        config.vision_encoder is None and config.towers is None)


def _select(
        catalog: dict[str, tuple[tuple[int, ...], np.dtype]],
        config: TransformerConfig | None,
        text_only: bool,
        path: Path,
        skip: set[str],
) -> list[str]:
    """The stored arrays to read, after checking them against `config`; raises ValueError naming them.

    `skip` is left out of the list but, with a `config`, still checked (shape and dtype from the header).
    The expected parameters are the weight schema's, so any config our model can build validates.
    """
    if config is None:
        return [name for name in catalog if name not in skip]
    expected = {path: info.shape for path, info in text_schema(config).items()}
    missing = sorted(expected.keys() - catalog.keys())
    if missing:
        raise ValueError(f'{path} lacks {len(missing)} parameter(s) of the model: {", ".join(missing[:8])}'
                         f'{" ..." if len(missing) > 8 else ""}.')
    problems = [f'{name} has shape {catalog[name][0]}, expected {shape}'
                for name, shape in expected.items() if catalog[name][0] != shape]
    problems += [f'{name} has dtype {catalog[name][1]}, expected a float dtype'
                 for name in expected if catalog[name][1] not in hf_mapping.FLOAT_DTYPES]
    if problems:
        raise ValueError(f'{path} does not fit the model config: ' + '; '.join(problems[:8]))

    extra = sorted(catalog.keys() - expected.keys())
    vision = [name for name in extra if name.startswith(VISION_PREFIXES)]
    unexpected = sorted(set(extra) - set(vision))
    if unexpected:
        raise ValueError(f'{path} has {len(unexpected)} parameter(s) this model does not have: '
                         f'{", ".join(unexpected[:8])}{" ..." if len(unexpected) > 8 else ""}.')
    if text_only:
        if vision:
            groups = collections.Counter(next(p for p in VISION_PREFIXES if name.startswith(p)) for name in vision)
            logger.info('Loading %s into a text-only model: dropped %d vision parameters (%s).', path, len(vision),
                        ', '.join(f'{g}* ({n})' for g, n in sorted(groups.items())))
        return [name for name in expected if name not in skip]
    if not vision:
        raise ValueError(f'{path} holds no vision encoder parameters. {WITHOUT_SIGLIP_ADVICE}')
    return [name for name in expected if name not in skip] + vision
