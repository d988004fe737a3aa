"""Our own checkpoint format: one safetensors file, keys are '/'-joined parameter paths.

The file's metadata names the format and its version, which is how `load_params` recognises it.
Saving is atomic: the file is written under a temporary name in the target directory, flushed to
disk, then renamed over the target, so an interrupted save leaves the previous checkpoint intact.

Example:
    >>> save_params(params, 'e4b.safetensors')
    >>> params = load_params('e4b.safetensors', dtype=jnp.bfloat16)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from safetensors.numpy import save_file

from gemma3n.checkpoints import hf_mapping
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.validation import check_finite

FORMAT_KEY = 'format'
FORMAT_NAME = 'gemma3n-params'
VERSION_KEY = 'format_version'
FORMAT_VERSION = '1'
CHECKPOINT_MODE = 0o644   # mkstemp creates owner-only files; a checkpoint is an ordinary readable file


def is_native(files: SafetensorsFiles, path: Path) -> bool:
    """Whether `path` (already opened as `files`) is in our format; a newer version is an error."""
    metadata = files.metadata[path]
    if metadata.get(FORMAT_KEY) != FORMAT_NAME:
        return False
    if metadata.get(VERSION_KEY) != FORMAT_VERSION:
        raise ValueError(f'{path} is a {FORMAT_NAME} checkpoint of format version {metadata.get(VERSION_KEY)!r}; '
                         f'this library reads version {FORMAT_VERSION}.')
    return True


def native_catalog(files: SafetensorsFiles) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {key: files.shape_and_dtype(key) for key in files.keys()}


def native_read(files: SafetensorsFiles, paths: Sequence[str], dtype: Any,
                progress: Callable[[int], None],
                transform: hf_mapping.Transform | None = None) -> dict[str, Any]:
    """The tensors at `paths`, one at a time, cast to `dtype` (None: as stored) and checked for
    NaN/Inf, each passed through `transform(path, array)` when given, before the next is read."""
    flat = {}
    for name in paths:
        value = files.read(name)
        size = value.size
        if dtype is not None:
            with np.errstate(over='ignore'):      # check_finite reports it, naming the tensor
                value = value.astype(dtype, copy=False)
        check_finite(f'Tensor {files.describe(name)}', value)
        flat[name] = value if transform is None else transform(name, value)
        del value
        progress(size)
    return flat


def save_params(params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes `params` (nested dict of numpy or jax arrays) to `path` atomically, dtypes as they are.

    Example:
        >>> save_params({'final_norm': {'scale': np.ones(4, np.float32)}}, 'ckpt.safetensors')
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f'save_params writes one file; {path} is a directory.')
    if not path.parent.is_dir():
        raise FileNotFoundError(f'Directory {path.parent} does not exist.')
    flat = {name: np.ascontiguousarray(np.asarray(leaf)) for name, leaf in hf_mapping.flatten_params(params).items()}
    if not flat:
        raise ValueError('save_params got an empty parameter tree.')
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp_name, metadata={FORMAT_KEY: FORMAT_NAME, VERSION_KEY: FORMAT_VERSION})
        os.chmod(tmp_name, CHECKPOINT_MODE)   # save_file writes a new file: set the mode afterwards
        with open(tmp_name, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable (POSIX); a crash after it keeps the new file.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
