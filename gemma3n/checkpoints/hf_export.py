"""Our text decoder as a Hugging Face checkpoint that `transformers.Gemma3nForCausalLM` loads.

`save_hf` writes `config.json` and the weights (`model.safetensors`, or shards of at most
`max_shard_bytes` with `model.safetensors.index.json`), named and laid out by
`hf_mapping.params_to_hf`. The export is exact: the tensors are ours, transposed and reshaped
(cast only when `dtype` asks), and the config describes the same model, so transformers computes
our logits. Two things HF cannot express are handled here:

- A config outside HF's Gemma 3n (`hf_mapping.check_representable`) is refused before any file
  is written.
- HF always soft-caps the final logits (its config refuses None). A model without a cap, as
  Google's reference and our presets are, is written with the cap `HF_NO_SOFTCAP`, so large
  that `cap * tanh(x / cap)` equals x to within float32 rounding; so transformers computes the
  uncapped logits, and `gemma3n` reads the cap back as none.

The vocabulary gets the hub's 256 extra rows, copies of the pad row as in the released
checkpoints (docs/architecture.md §8), so the export's logits past ours equal the pad token's.
The vision and audio towers are not exported (HF's causal LM is text-only).

Example:
    >>> files = save_hf('exported', params, model.config, dtype=jnp.bfloat16)
    >>> hf = transformers.Gemma3nForCausalLM.from_pretrained('exported')
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.checkpoints.hf_config import HF_NO_SOFTCAP, check_representable, hf_text_config
from gemma3n.checkpoints.hf_mapping import params_to_hf
from gemma3n.checkpoints.loader import VISION_PREFIXES
from gemma3n.checkpoints.native import CHECKPOINT_MODE
from gemma3n.checkpoints.safetensors_hf import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from gemma3n.config import TransformerConfig
from gemma3n.validation import check_finite

# The prefix of the text decoder's tensors in `Gemma3nForCausalLM`'s state dict.
CAUSAL_LM_PREFIX = 'model.'
# HF's own default shard size for hub checkpoints (5 GB), the size the released ones use.
DEFAULT_MAX_SHARD_BYTES = 5 * 10 ** 9
SHARD_NAME = 'model-{index:05d}-of-{count:05d}.safetensors'
# The dtypes an export may be written in, by their names in config.json.
EXPORT_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}
# transformers reads the safetensors metadata's format to know the tensors are PyTorch's layout.
SAFETENSORS_METADATA = {'format': 'pt'}


def check_export_directory(directory: str | os.PathLike) -> Path:
    """The directory a checkpoint may be written to (an export, a conversion; created when
    missing); ValueError when it already holds a checkpoint, whose files would mix with the new."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f'{directory} is a file: the checkpoint is written to a directory.')
    if not directory.parent.is_dir():
        raise FileNotFoundError(f'Directory {directory.parent} does not exist.')
    if directory.is_dir():
        present = sorted(p.name for p in directory.iterdir()
                         if p.name in (CONFIG_FILE, INDEX_FILE) or p.suffix == '.safetensors')
        if present:
            raise ValueError(f'{directory} already holds a checkpoint ({", ".join(present)}): '
                             'write to a new or empty directory.')
    return directory


def export_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of an export dtype given as a name, numpy or JAX dtype; ValueError if the
    export cannot be written in it."""
    try:
        chosen = EXPORT_DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
    except (KeyError, TypeError):
        chosen = None
    if chosen not in EXPORT_DTYPES.values():
        raise ValueError(f'cannot export in dtype {dtype!r}: choose one of '
                         f'{", ".join(EXPORT_DTYPES)}.')
    return chosen


def hf_export_config(config: TransformerConfig, dtype: np.dtype) -> dict[str, Any]:
    """The config.json of `config` exported as a `Gemma3nForCausalLM` in `dtype`."""
    hf = hf_text_config(config)
    hf.update(model_type='gemma3n_text', architectures=['Gemma3nForCausalLM'],
              dtype=next(name for name, d in EXPORT_DTYPES.items() if d == dtype))
    if config.final_logit_softcap is None:
        hf['final_logit_softcapping'] = HF_NO_SOFTCAP
    return hf


def save_hf(directory: str | os.PathLike, params: Mapping[str, Any], config: TransformerConfig,
            *, dtype: Any = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Writes the text decoder `params` (our tree for `config`) as a Hugging Face
    `Gemma3nForCausalLM` checkpoint in `directory`; returns the files written.

    Args:
        directory: created when missing; must not hold a checkpoint already.
        params: the nested parameter tree in the checkpoint layout (what `load_params` returns
            or `init` makes, not a serving layout); the vision tower's parameters are left out.
        config: the model's config; ValueError naming every setting HF cannot express.
        dtype: 'float32' or 'bfloat16' (or the dtype); None: the dtype the weights have.
        max_shard_bytes: the largest weights file; more weights go into shards with an index.

    Every check (config, tree, dtype, NaN/Inf in the weights, the directory) runs before the
    first file is written; config.json is written last, so an interrupted export is recognisably
    incomplete. Memory: the weights plus one transposed copy of the projections.
    """
    check_representable(config)
    directory = check_export_directory(directory)
    if max_shard_bytes < 1:
        raise ValueError(f'max_shard_bytes must be positive, got {max_shard_bytes}.')
    text = {path: leaf for path, leaf in flatten_params(params).items()
            if not path.startswith(VISION_PREFIXES)}
    tensors = params_to_hf(unflatten_params(text), config, prefix=CAUSAL_LM_PREFIX)
    if dtype is None:
        dtypes = sorted({str(t.dtype) for t in tensors.values()})
        if len(dtypes) != 1:
            raise ValueError(f'the weights have several dtypes ({", ".join(dtypes)}): pass dtype= '
                             'to export them in one.')
        dtype = dtypes[0]
    dtype = export_dtype(dtype)
    for key, tensor in tensors.items():
        check_finite(f'Weight {key}', tensor)
    shards = _plan_shards(tensors, dtype.itemsize, max_shard_bytes)
    total_bytes = sum(t.size for t in tensors.values()) * dtype.itemsize

    directory.mkdir(exist_ok=True)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [SHARD_NAME.format(index=i + 1, count=len(shards)) for i in range(len(shards))])
    for name, keys in zip(names, shards):
        # Each tensor is cast and dropped as its shard is written: one shard's copy at a time.
        save_file({key: np.ascontiguousarray(tensors.pop(key).astype(dtype, copy=False))
                   for key in keys}, directory / name, metadata=SAFETENSORS_METADATA)
        os.chmod(directory / name, CHECKPOINT_MODE)   # save_file makes owner-only files
    written = [directory / name for name in names]
    if len(shards) > 1:
        index = {'metadata': {'total_size': total_bytes},
                 'weight_map': {key: name for name, keys in zip(names, shards) for key in keys}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + '\n')
        written.append(directory / INDEX_FILE)
    (directory / CONFIG_FILE).write_text(
        json.dumps(hf_export_config(config, dtype), indent=2, sort_keys=True) + '\n')
    return written + [directory / CONFIG_FILE]


def _plan_shards(tensors: Mapping[str, np.ndarray], itemsize: int, max_bytes: int
                 ) -> list[list[str]]:
    """The keys of each shard, in order: a new shard starts where the next tensor would push
    the current one past `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.size * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards
