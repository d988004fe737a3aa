"""A checkpoint already in the serving layout (`gemma3n convert`), loaded by mapping its file.

`gemma3n.load` of an ordinary checkpoint re-lays out every weight (and quantizes it with int8 /
int4) as it reads it (`gemma3n.layout`). A converted folder holds the result: `config.json`,
`tokenizer.model` and `serving.safetensors` (`checkpoints/serving_file.py`), one tensor per
array of each serving leaf, as it lies in memory: a `ServingWeight`'s value; a
`QuantizedWeight`'s int8 values and float32 scales; an `Int4Weight`'s packed bytes and float16
scales; a `StackedWeight`'s parts; the per-layer table [V, num_layers, P] as the lazy reader
wants it (`checkpoints/per_layer_table.py`). Loading maps the file and hands each array to the
device, which adopts it without a copy: nothing is converted and nothing is read until used.

The file does not describe the leaves' structure: `serving_leaves` derives it from the weight
schema and `ServingConverter` (jax.eval_shape of the conversion, nothing computed), for the
model config.json describes and the representation the metadata names. Writing and reading
both go through it, so the converted file is checked like every loader's: a missing, extra,
misshapen or mistyped tensor is refused naming its key, before any array is touched.

Keys: a parameter's path for a plain array, else path ':' the leaf's field path
(`layer_0/mlp/gating_einsum:parts/0/q`).

Example:
    >>> save_converted('e4b-int8', gemma3n.load('gemma-3n-E4B-it', quantize='int8'))
    >>> loaded = gemma3n.load('e4b-int8')        # int8 as stored; quantize='int4' is refused
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.checkpoints.hf_export import check_export_directory
from gemma3n.checkpoints.loader import Checkpoint
from gemma3n.checkpoints.native import folder_config, write_folder_companions
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.checkpoints.serving_file import SERVING_FILE, Tensor, map_serving_file, write_serving_file
from gemma3n.embedder import PER_LAYER_TABLE_PATH
from gemma3n.host_arrays import to_device
from gemma3n.layers import StoredWeight
from gemma3n.layout import ServingConverter, to_serving
from gemma3n.load_error import LoadError
from gemma3n.loaded_model import LoadedModel
from gemma3n.schema import model_schema
from gemma3n.transformer import Gemma3nTransformer
from gemma3n.validation import check_all_finite

# The metadata naming the representation: the model's dtype and the quantization.
DTYPE_KEY, QUANTIZE_KEY = 'dtype', 'quantize'
UNQUANTIZED = 'none'
LEAF_SEPARATOR = ':'               # between a parameter's path and its leaf's field path
# Bytes of per-layer table rows written at a time (the table is read from its source lazily).
TABLE_CHUNK_BYTES = 64 << 20


def serving_leaves(model: Gemma3nTransformer, quantize: str | None) -> dict[str, Any]:
    """{parameter path: its abstract serving leaf} of `model` (the per-layer table, kept apart,
    left out): what `ServingConverter` makes of each weight of the schema in the model's
    dtype, shapes and dtypes only (`jax.ShapeDtypeStruct`s, inside a `StoredWeight` for a
    projection)."""
    convert = ServingConverter(model, quantize_int8=quantize == 'int8',
                               quantize_int4=quantize == 'int4')
    return {path: jax.eval_shape(functools.partial(convert, path),
                                 jax.ShapeDtypeStruct(info.shape, model.dtype))
            for path, info in model_schema(model).items() if path != PER_LAYER_TABLE_PATH}


def _file_keys(path: str, leaf: Any) -> list[tuple[str, Any]]:
    """(file key, array) of each array of `leaf`, the leaf of parameter `path`."""
    if not isinstance(leaf, StoredWeight):
        return [(path, leaf)]
    return [(f'{path}{LEAF_SEPARATOR}{jax.tree_util.keystr(field, simple=True, separator="/")}',
             array) for field, array in jax.tree_util.tree_flatten_with_path(leaf)[0]]


def _mismatch(key: str, actual: Any, expected: Any) -> str | None:
    """What is wrong with array `actual` (None: nothing), where `expected` was wanted."""
    if tuple(actual.shape) != tuple(expected.shape) or np.dtype(actual.dtype) != expected.dtype:
        return (f'{key} is {np.dtype(actual.dtype).name} {tuple(actual.shape)}, expected '
                f'{np.dtype(expected.dtype).name} {tuple(expected.shape)}')
    return None


def _refuse(where: str, missing: list[str], extra: list[str], problems: list[str]) -> None:
    """ValueError listing what does not fit (a few of each kind), unless nothing."""
    parts = [f'{len(names)} {kind}: {", ".join(names[:6])}{" ..." if len(names) > 6 else ""}'
             for kind, names in (('missing', missing), ('unexpected', extra)) if names]
    parts += problems[:6]
    if parts:
        raise ValueError(f'{where} does not fit the serving layout of its model: '
                         + '; '.join(parts) + '.')


def save_converted(folder: str | os.PathLike, loaded: LoadedModel) -> Path:
    """Writes `loaded` (as `gemma3n.load` returned it, any quantization) to the new or empty
    `folder` as a converted checkpoint; returns the weights file's path.

    Only the text decoder is written (its towers are not), with its tokenizer if it has one
    (a model loaded with `tokenizer=False` is then loaded the same way). Weights are written as they
    are; the per-layer table is copied from its checkpoint a chunk of rows at a time. The demo
    model's random weights (held in the checkpoint layout unless quantized) are converted first.
    """
    folder = check_export_directory(folder)
    model = loaded.model
    hf_config = folder_config(model.config)         # refuses a config.json-less config early
    flat = flatten_params(loaded.params)
    table = flat.pop(PER_LAYER_TABLE_PATH, None)
    if not any(isinstance(leaf, StoredWeight) for leaf in flat.values()):
        flat = flatten_params(to_serving(model, unflatten_params(flat))[1])
    expected = serving_leaves(model, loaded.quantize)
    tensors, problems = [], []
    for path, leaf in expected.items():
        if path not in flat:
            continue
        wanted, given = _file_keys(path, leaf), _file_keys(path, flat[path])
        if [key for key, _ in wanted] != [key for key, _ in given]:
            problems.append(f'{path} is a {type(flat[path]).__name__}, expected a '
                            f'{type(leaf).__name__}')
            continue
        for (key, abstract), (_, array) in zip(wanted, given):
            problems += filter(None, [_mismatch(key, array, abstract)])
            tensors.append(Tensor(key, tuple(abstract.shape), abstract.dtype,
                                  functools.partial(_whole, array)))
    _refuse('the model to convert', sorted(expected.keys() - flat.keys()),
            sorted(flat.keys() - expected.keys()), problems)
    source = loaded.per_layer_table if table is None else np.asarray(table)
    shape = model_schema(model)[PER_LAYER_TABLE_PATH].shape
    tensors.append(Tensor(PER_LAYER_TABLE_PATH, shape, np.dtype(model.dtype),
                          functools.partial(_table_rows, source, shape, np.dtype(model.dtype))))
    folder.mkdir(exist_ok=True)
    quantize = loaded.quantize or UNQUANTIZED
    write_serving_file(folder / SERVING_FILE, tensors,
                       {DTYPE_KEY: jnp.dtype(model.dtype).name, QUANTIZE_KEY: quantize})
    write_folder_companions(folder, hf_config,
                            None if loaded.tokenizer is None else loaded.tokenizer.path)
    return folder / SERVING_FILE


def _whole(array: Any) -> Iterator[np.ndarray]:
    yield np.asarray(array)


def _table_rows(source: Any, shape: tuple[int, ...], dtype: np.dtype) -> Iterator[np.ndarray]:
    """The per-layer table's rows from `source` (an array or a lazy table), in chunks."""
    rows = max(1, TABLE_CHUNK_BYTES // (math.prod(shape[1:]) * dtype.itemsize))
    for start in range(0, shape[0], rows):
        yield np.asarray(source[np.arange(start, min(start + rows, shape[0]))], dtype)


def stored_representation(checkpoint: Checkpoint) -> tuple[str, str | None]:
    """(dtype name, quantization or None) of a converted checkpoint, from its header."""
    metadata = SafetensorsFiles([checkpoint.path]).metadata[checkpoint.path]
    quantize = metadata.get(QUANTIZE_KEY)
    dtype = metadata.get(DTYPE_KEY)
    if quantize is None or dtype is None:
        raise ValueError(f'{checkpoint.path} does not say its representation (metadata '
                         f'{DTYPE_KEY!r} and {QUANTIZE_KEY!r}): convert the checkpoint again.')
    return dtype, None if quantize == UNQUANTIZED else quantize


def check_representation(checkpoint: Checkpoint, dtype: Any, quantize: str | None
                         ) -> tuple[Any, str | None]:
    """The dtype and quantization a load of converted `checkpoint` takes: those stored; a
    LoadError when the caller asks for others (a converted checkpoint is loaded as it is:
    convert the original again for another representation)."""
    stored_dtype, stored_quantize = stored_representation(checkpoint)
    remedy = ('; leave it out, or convert the original checkpoint again (`gemma3n convert '
              '--int8`, `--int4`, `--dtype`)')
    if quantize is not None and quantize != stored_quantize:
        raise LoadError(f'{{quantize}} does not match {{path}}, converted with '
                        f'{stored_quantize or "no quantization"}' + remedy,
                        {'quantize': quantize}, path=checkpoint.path)
    if dtype is not None and jnp.dtype(dtype).name != stored_dtype:
        raise LoadError(f'{{dtype}} does not match {{path}}, converted in {stored_dtype}' + remedy,
                        {'dtype': dtype}, path=checkpoint.path)
    return stored_dtype, stored_quantize


def load_converted(checkpoint: Checkpoint, model: Gemma3nTransformer, quantize: str | None
                   ) -> Any:
    """The serving-layout params of converted `checkpoint` for `model` (the per-layer table left
    in the file), each array the mapped file's, adopted by the device without a copy (a few
    small unaligned ones are copied). Every tensor is checked against `serving_leaves` before
    any is used; float ones are checked for NaN/Inf as every loader does."""
    # The per-layer table is read row by row, by positioned reads: not ahead.
    _, arrays = map_serving_file(checkpoint.path, read_lazily=(PER_LAYER_TABLE_PATH,))
    expected = serving_leaves(model, quantize)
    wanted = {path: _file_keys(path, leaf) for path, leaf in expected.items()}
    keys = {key for entries in wanted.values() for key, _ in entries} | {PER_LAYER_TABLE_PATH}
    problems = [problem for entries in wanted.values() for key, abstract in entries
                if key in arrays for problem in [_mismatch(key, arrays[key], abstract)] if problem]
    _refuse(str(checkpoint.path), sorted(keys - arrays.keys()), sorted(arrays.keys() - keys),
            problems)
    check_all_finite({f'Tensor {key} of {checkpoint.path}': arrays[key]
                      for entries in wanted.values() for key, _ in entries})
    params = {}
    for path, entries in wanted.items():
        leaves = [to_device(arrays[key]) for key, _ in entries]
        params[path] = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(expected[path]), leaves)
    return unflatten_params(params)
