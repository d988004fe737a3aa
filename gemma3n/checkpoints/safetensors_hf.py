"""Hugging Face Gemma 3n checkpoints (safetensors) -> our text parameter tree.

Accepts a model directory (`model.safetensors.index.json` with shards, or one `model.safetensors`,
plus `config.json`) or a single `.safetensors` file (its directory's `config.json` is used when
present). Tensors are read lazily, one at a time, largest first, and converted straight to the
target dtype, so peak memory stays close to the size of the result. What our model has no use for
(k/v projections of KV-shared layers, extra vocabulary rows, vision and audio towers) is skipped
and reported in one log line.

Example:
    >>> params = load_hf_params(Path('gemma-3n-E4B-it'), config=None, dtype=jnp.bfloat16)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Collection

import tqdm

from gemma3n.checkpoints import hf_mapping, hf_towers
from gemma3n.checkpoints.hf_config import check_hf_config, config_from_hf, hf_final_logit_softcap
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.config import TransformerConfig
from gemma3n.towers_config import TowersConfig

INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'

logger = logging.getLogger(__name__)


class HFSoftcapWarning(UserWarning):
    """A HF checkpoint's config.json sets a final logit softcap the model it loads into does not use.

    A warning (not a log line) so that a program that settles the choice itself, such as the
    `gemma3n` command with its --hf-softcap option, can silence it.
    """


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and ((path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file())


def read_hf_config(path: Path) -> dict[str, Any] | None:
    """The config.json of a HF checkpoint (directory or file inside it); None when there is none."""
    config_path = config_file(path)
    if not config_path.is_file():
        return None
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f'{config_path} is not valid JSON: {err}') from err


def _weight_map(path: Path) -> dict[str, str] | None:
    """tensor -> shard file name from the index of a sharded checkpoint directory; None if unsharded."""
    index_path = path / INDEX_FILE
    if not path.is_dir() or not index_path.is_file():
        return None
    try:
        weight_map = json.loads(index_path.read_text())['weight_map']
        return {str(key): str(name) for key, name in weight_map.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f'{index_path} is not a valid safetensors index (needs a "weight_map"): {err}') from err


def open_hf_files(path: Path) -> SafetensorsFiles:
    """The safetensors file(s) of a HF checkpoint directory or single file, cross-checked with the index."""
    if path.is_file():
        return SafetensorsFiles([path])
    weight_map = _weight_map(path)
    if weight_map is None:
        return SafetensorsFiles([path / SINGLE_FILE])
    files = SafetensorsFiles(path / name for name in sorted(set(weight_map.values())))
    wrong = [f'{key} (index: {name}, found in {files.file_of(key).name if key in files else "no shard"})'
             for key, name in weight_map.items()
             if key not in files or files.file_of(key).name != name]
    if wrong:
        raise ValueError(f'{path / INDEX_FILE} lists tensors its shards do not hold: {", ".join(wrong[:8])}'
                         f'{f" ... ({len(wrong) - 8} more)" if len(wrong) > 8 else ""}.')
    return files


def config_file(path: Path) -> Path:
    """Where the config.json of the HF checkpoint at `path` (a directory or a file in one) is."""
    return (path if path.is_dir() else path.parent) / CONFIG_FILE


def hf_checkpoint_config(path: Path, config: TransformerConfig | None,
                         hf_config: dict[str, Any] | None) -> TransformerConfig:
    """The model config of the HF checkpoint at `path`, whose config.json `read_hf_config` gave
    as `hf_config` (None: it has none).

    `config` None: derived from `hf_config`. Otherwise `hf_config` (when present) is checked
    against it and mismatches raise ValueError listing every field by name.
    """
    config_path = config_file(path)
    if hf_config is None:
        if config is None:
            raise ValueError(f'No {CONFIG_FILE} next to {path}: pass model= to say which Gemma 3n size it holds.')
        return config
    if config is None:
        try:
            config = config_from_hf(hf_config)
        except ValueError as err:
            raise ValueError(f'{config_path}: {err}') from err
    problems = check_hf_config(hf_config, config)
    if problems:
        raise ValueError(f'{config_path} does not match the model config: ' + '; '.join(problems))
    return config


def hf_prefix(path: Path, files: SafetensorsFiles) -> str:
    """The key prefix of the text decoder in the HF checkpoint at `path` (opened as `files`)."""
    try:
        return hf_mapping.detect_hf_prefix(files.keys())
    except ValueError as err:
        raise ValueError(f'{path}: {err}') from err


def load_hf_params(
        path: Path,
        *,
        config: TransformerConfig | None,
        hf_config: dict[str, Any] | None,
        dtype: Any = None,
        progress: bool = True,
        skip: Collection[str] = (),
        transform: hf_mapping.Transform | None = None,
        towers: TowersConfig | None = None,
) -> dict[str, Any]:
    """Our nested params (np.ndarray leaves) from a HF Gemma 3n checkpoint at `path`.

    `config`, `hf_config`: as for `hf_checkpoint_config`. `skip`: paths of our tree left out of the result; their
    tensors are not read. `transform`: as for `hf_mapping.hf_to_params`. `towers`: the released
    towers to keep (config.json must describe the same), under `towers/` (float32 unless
    `dtype`); without it their tensors are dropped.
    """
    config = hf_checkpoint_config(path, config, hf_config)
    if hf_config is not None:
        _note_softcap(hf_config, config, config_file(path))
    if towers is not None:
        hf_towers.check_towers_config(path, hf_config, towers)

    files = open_hf_files(path)
    prefix = hf_prefix(path, files)
    keys = files.keys()
    total = sum(math.prod(e.shape) for e in hf_mapping.mapping_entries(config) if e.path not in skip)
    if towers is not None:
        tower_keys = [key for key in keys if key.startswith(hf_towers.TOWER_PREFIXES)]
        keys = [key for key in keys if not key.startswith(hf_towers.TOWER_PREFIXES)]
        total += sum(math.prod(files.shape_and_dtype(key)[0]) for key in tower_keys)
    with tqdm.tqdm(total=total, desc=f'Loading {path.name}', unit='param', unit_scale=True,
                   disable=not progress) as bar:
        try:
            params, dropped = hf_mapping.hf_to_params(files.read, keys, config, prefix=prefix, dtype=dtype,
                                                      progress=bar.update, describe=files.describe, skip=skip,
                                                      transform=transform)
            if towers is not None:
                params[hf_towers.TOWERS] = hf_towers.read_towers(
                    files, towers, config.embed_dim, dtype=dtype, progress=bar.update,
                    transform=transform)
        except ValueError as err:
            raise ValueError(f'{path}: {err}') from err
    logger.info('Loaded %s: %s%s.', path, dropped.summary(),
                '' if towers is None else f'; kept the towers ({", ".join(params["towers"])})')
    return params


def _note_softcap(hf_config: dict[str, Any], config: TransformerConfig, config_path: Path) -> None:
    hf_cap = hf_final_logit_softcap(hf_config)
    if hf_cap != config.final_logit_softcap:
        warnings.warn(f'{config_path} sets final_logit_softcapping={hf_cap} but the model uses '
                      f'final_logit_softcap={config.final_logit_softcap}; to match transformers, '
                      'build the model with gemma3n.checkpoints.apply_hf_softcap(model, path).',
                      HFSoftcapWarning, stacklevel=2)


def apply_hf_softcap(model: Any, path: str | Path) -> Any:
    """`model` (a Flax module with `config`, or a TransformerConfig) with the checkpoint's final softcap.

    Example:
        >>> model = apply_hf_softcap(Gemma3n_E4B(text_only=True), 'gemma-3n-E4B-it')
    """
    hf_config = read_hf_config(Path(path))
    if hf_config is None:
        raise FileNotFoundError(f'No {CONFIG_FILE} found for {path}.')
    cap = hf_final_logit_softcap(hf_config)
    if isinstance(model, TransformerConfig):
        return dataclasses.replace(model, final_logit_softcap=cap)
    return model.clone(config=dataclasses.replace(model.config, final_logit_softcap=cap))
