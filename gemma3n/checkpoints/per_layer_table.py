"""The per-layer embedding table read row by row from the checkpoint file, never held in memory.

`embedder/per_layer_input_embedding` [V, num_layers, P] is E4B's largest array (262144 x 35 x 256,
4.7 GB in bfloat16), yet generation only ever gathers the rows of the tokens it sees. A
`LazyPerLayerTable` keeps the file open and reads just those rows with positioned reads.

Why not memory-map it (as `safe_open` does): on kernels with large page-cache folios (Linux 6.x
ext4/xfs) touching one 18 KB row of a mapping maps up to 2 MB of the file into the process, so 512
scattered rows made a 1.2 GB table count ~0.7 GB of resident memory; plain reads copy only the rows.

Example:
    >>> table = open_per_layer_table('gemma-3n-E4B-it', model=Gemma3n_E4B(text_only=True))
    >>> rows = table[per_layer_token_ids(tokens, table.shape[0])]     # [B, L, 35, 256] bfloat16
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from gemma3n.checkpoints import hf_mapping
from gemma3n.checkpoints.loader import HF_FORMAT, ORBAX_FORMAT, Checkpoint, model_config, open_checkpoint
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles, read_into
from gemma3n.checkpoints.safetensors_hf import hf_checkpoint_config, hf_prefix, open_hf_files
from gemma3n.config import TransformerConfig
from gemma3n.embedder import PER_LAYER_TABLE_PATH
from gemma3n.schema import text_schema
from gemma3n.validation import check_finite

DEFAULT_DTYPE = np.dtype(ml_dtypes.bfloat16)
SHOWN_BAD_IDS = 8                # how many out-of-range ids an error message lists


class LazyPerLayerTable:
    """Rows of a per-layer embedding table [V, num_layers, P] read from a safetensors file on demand.

    The file stores the table under `key` as [V, num_layers, P] (our format) or [V, num_layers * P]
    (Hugging Face's layer-major `embed_tokens_per_layer.weight`); both lay rows out alike. Only the
    rows asked for are read, each distinct id once. Close it (or use it as a context manager) to
    release the file. One gather at a time: reads share the open file's position.

    Example:
        >>> with LazyPerLayerTable('e4b.safetensors', 'embedder/per_layer_input_embedding',
        ...                        (262144, 35, 256)) as table:
        ...     rows = table[np.array([[2, 106, 2]])]                 # [1, 3, 35, 256] bfloat16
    """

    def __init__(
            self,
            file: str | os.PathLike,
            key: str,
            shape: tuple[int, int, int],
            *,
            stored_shape: tuple[int, ...] | None = None,
            dtype: Any = DEFAULT_DTYPE,
    ):
        """`shape`: the table's [V, num_layers, P]; `stored_shape`: the shape the file must hold
        (default `shape`); `dtype`: of the rows returned."""
        self.file = Path(file)
        self.key = key
        self._shape = tuple(int(n) for n in shape)
        self._dtype = np.dtype(dtype)
        stored_shape = self._shape if stored_shape is None else tuple(stored_shape)
        if len(self._shape) != 3 or math.prod(stored_shape) != math.prod(self._shape) \
                or stored_shape[0] != self._shape[0]:
            raise ValueError(f'A per-layer table of shape {self._shape} cannot be stored as {stored_shape}.')
        if self._dtype not in hf_mapping.FLOAT_DTYPES:
            raise ValueError(f'dtype must be a float dtype, got {self._dtype}.')

        files = SafetensorsFiles([self.file])
        if key not in files:
            raise ValueError(f'{self.file} holds no tensor {key}.')
        actual_shape, self.stored_dtype = files.shape_and_dtype(key)
        if actual_shape != stored_shape:
            raise ValueError(f'Tensor {key} in {self.file} has shape {actual_shape}, expected {stored_shape} '
                             f'(the per-layer table [V, num_layers, P] = {self._shape} of the model config).')
        if self.stored_dtype not in hf_mapping.FLOAT_DTYPES:
            raise ValueError(f'Tensor {key} in {self.file} has dtype {self.stored_dtype}, expected a float dtype.')
        self._row_bytes = math.prod(self._shape[1:]) * self.stored_dtype.itemsize
        self._data_start = files.span(key).position
        self._reader = open(self.file, 'rb', buffering=0)
        if hasattr(os, 'posix_fadvise'):
            # Rows are scattered: readahead (8 MB on some systems) would pull megabytes per row from disk.
            os.posix_fadvise(self._reader.fileno(), 0, 0, os.POSIX_FADV_RANDOM)

    @property
    def shape(self) -> tuple[int, int, int]:
        """[V, num_layers, P]."""
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        """dtype of the rows returned (the file may store another float dtype: `stored_dtype`)."""
        return self._dtype

    @property
    def nbytes_on_disk(self) -> int:
        return math.prod(self._shape) * self.stored_dtype.itemsize

    def __getitem__(self, ids: Any) -> np.ndarray:
        """ids: int array of any shape [...] with values in [0, V) -> rows [..., num_layers, P]."""
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f'Per-layer table ids must be integers, got an array of {ids.dtype}.')
        vocab_size = self._shape[0]
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise ValueError(f'Per-layer table ids must lie in [0, {vocab_size}); got {bad.size} outside: '
                             f'{np.unique(bad)[:SHOWN_BAD_IDS].tolist()} (map image/placeholder ids with '
                             'per_layer_token_ids first).')
        unique, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        rows = self._read_rows(unique).view(self.stored_dtype).reshape(-1, *self._shape[1:])
        rows = rows.astype(self._dtype, copy=False)
        # The table is never loaded whole, so its rows are checked for NaN/Inf as they are read.
        check_finite(f'Tensor {self.key} in {self.file} (rows {unique[:SHOWN_BAD_IDS].tolist()}'
                     f'{" ..." if unique.size > SHOWN_BAD_IDS else ""})', rows)
        return rows[inverse.reshape(-1)].reshape(*ids.shape, *self._shape[1:])

    def _read_rows(self, ids: np.ndarray) -> np.ndarray:
        """Raw bytes [len(ids), row_bytes] of sorted distinct `ids`, one read per run of consecutive ids."""
        out = np.empty((ids.size, self._row_bytes), np.uint8)
        run_starts = np.flatnonzero(np.diff(ids, prepend=-2) != 1)   # -2: id 0 still starts a run
        for first, stop in zip(run_starts, [*run_starts[1:], ids.size]):
            read_into(self._reader, out[first:stop], self._data_start + int(ids[first]) * self._row_bytes,
                      f'{self.file}, inside tensor {self.key},')
        return out

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> LazyPerLayerTable:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f'LazyPerLayerTable({str(self.file)!r}, {self.key!r}, shape={self._shape}, '
                f'stored_dtype={self.stored_dtype}, dtype={self._dtype})')


def open_per_layer_table(
        path: str | os.PathLike | Checkpoint,
        *,
        model: Any = None,
        dtype: Any = DEFAULT_DTYPE,
) -> LazyPerLayerTable:
    """The per-layer embedding table of the checkpoint at `path`, read lazily.

    Args:
        path: a Hugging Face directory (sharded or not) / `.safetensors` file, or a file written by
            `save_params`, or a `Checkpoint` of one. Orbax checkpoints are not supported (use
            `load_params`).
        model: a `Gemma3nTransformer` or `TransformerConfig` the stored table is checked against.
            None: HF checkpoints derive the config from config.json; our files give the shape.
        dtype: of the rows returned (default bfloat16).

    Example:
        >>> params = load_params(path, model=model, dtype=jnp.bfloat16, skip_per_layer_table=True)
        >>> table = open_per_layer_table(path, model=model)
    """
    opened = open_checkpoint(path)
    path, checkpoint = opened.path, opened.format
    config, _ = model_config(model)
    if checkpoint == ORBAX_FORMAT:
        raise ValueError(f'{path} is an Orbax checkpoint, whose per-layer table cannot be read row by row: '
                         'load it with load_params (or save_params it to a safetensors file first).')
    if checkpoint == HF_FORMAT:
        config = hf_checkpoint_config(path, config, opened.hf_config)
        files = open_hf_files(path)
        entry = _table_entry(config)
        key = hf_prefix(path, files) + entry.hf_keys[0]
        return LazyPerLayerTable(files.file_of(key), key, entry.shape, stored_shape=entry.hf_shapes[0], dtype=dtype)
    if config is not None:
        return LazyPerLayerTable(path, PER_LAYER_TABLE_PATH, text_schema(config)[PER_LAYER_TABLE_PATH].shape,
                                 dtype=dtype)
    files = SafetensorsFiles([path])
    if PER_LAYER_TABLE_PATH not in files:
        raise ValueError(f'{path} holds no tensor {PER_LAYER_TABLE_PATH}.')
    shape, _ = files.shape_and_dtype(PER_LAYER_TABLE_PATH)
    if len(shape) != 3:
        raise ValueError(f'Tensor {PER_LAYER_TABLE_PATH} in {path} has shape {shape}, expected '
                         '[V, num_layers, P].')
    return LazyPerLayerTable(path, PER_LAYER_TABLE_PATH, shape, dtype=dtype)


def _table_entry(config: TransformerConfig) -> hf_mapping.ParamMapping:
    return next(e for e in hf_mapping.mapping_entries(config) if e.path == PER_LAYER_TABLE_PATH)
