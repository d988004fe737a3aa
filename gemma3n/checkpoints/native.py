"""Our own checkpoint format: one safetensors file, keys are '/'-joined parameter paths.

A checkpoint folder (`save_checkpoint_folder`, what fine-tuning writes) holds that file as
`params.safetensors`, the model's config as a Hugging Face `config.json` and the tokenizer's
`tokenizer.model`: the loaders and the command take the folder for the file it holds.

The file's metadata names the format and its version, which is how `load_params` recognises it.
Saving is atomic: the file is written in a hidden temporary folder beside the target, flushed to
disk, then renamed over the target, so an interrupted save leaves the previous checkpoint intact.
A save killed outright (kill -9, power loss) leaves its temporary folder behind; the next save to
the same target deletes it. A save holds a lock on its folder while it writes and only unlocked
folders are deleted, so concurrent saves (to any files) never delete each other's.

Example:
    >>> save_params(params, 'e4b.safetensors')
    >>> params = load_params('e4b.safetensors', dtype=jnp.bfloat16)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from safetensors.numpy import save_file

from gemma3n.checkpoints.flat_params import flatten_params
from gemma3n.checkpoints.hf_config import hf_text_config
from gemma3n.checkpoints.hf_mapping import Transform
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.checkpoints.safetensors_hf import CONFIG_FILE
from gemma3n.config import TransformerConfig
from gemma3n.validation import check_finite

FORMAT_KEY = 'format'
FORMAT_NAME = 'gemma3n-params'
VERSION_KEY = 'format_version'
FORMAT_VERSION = '1'
CHECKPOINT_MODE = 0o644   # mkstemp creates owner-only files; a checkpoint is an ordinary readable file
TEMPORARY_SUFFIX = '.gemma3n-save.tmp'    # '.<target name>.<random>' + this: a save's folder
FOLDER_PARAMS_FILE = 'params.safetensors'  # the params file of a checkpoint folder
FOLDER_TOKENIZER_FILE = 'tokenizer.model'

try:
    import fcntl
except ImportError:     # Windows: no advisory locks, so stale temporary folders are left there
    fcntl = None


def is_native(files: SafetensorsFiles, path: Path) -> bool:
    """Whether `path` (already opened as `files`) is in our format; a newer version is an error."""
    return has_format(files, path, FORMAT_NAME, FORMAT_VERSION)


def has_format(files: SafetensorsFiles, path: Path, name: str, version: str,
               other_version_hint: str = '') -> bool:
    """Whether `path` (opened as `files`) names format `name` in its metadata; another version
    of it is an error (ending in `other_version_hint`, what to do about it)."""
    metadata = files.metadata[path]
    if metadata.get(FORMAT_KEY) != name:
        return False
    if metadata.get(VERSION_KEY) != version:
        raise ValueError(f'{path} is a {name} checkpoint of format version '
                         f'{metadata.get(VERSION_KEY)!r}; this library reads version '
                         f'{version}{other_version_hint}.')
    return True


def native_catalog(files: SafetensorsFiles) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {key: files.shape_and_dtype(key) for key in files.keys()}


def native_read(files: SafetensorsFiles, paths: Sequence[str], dtype: Any,
                progress: Callable[[int], None],
                transform: Transform | None = None) -> dict[str, Any]:
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
    flat = {name: np.ascontiguousarray(np.asarray(leaf)) for name, leaf in flatten_params(params).items()}
    if not flat:
        raise ValueError('save_params got an empty parameter tree.')
    with atomic_file(path) as tmp_name:
        save_file(flat, tmp_name, metadata={FORMAT_KEY: FORMAT_NAME, VERSION_KEY: FORMAT_VERSION})


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path to write the file `path` to; when the block ends without an error it is
    flushed to disk, made readable (CHECKPOINT_MODE) and renamed over `path` (module docstring:
    an interrupted write leaves the previous file intact)."""
    _remove_stale_temporaries(path)
    folder, fd = _locked_temporary_folder(path)
    try:
        tmp_name = folder / path.name
        yield tmp_name
        os.chmod(tmp_name, CHECKPOINT_MODE)   # writers create new files: set the mode afterwards
        with open(tmp_name, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)       # releases the lock
    _fsync_directory(path.parent)


def _locked_temporary_folder(path: Path) -> tuple[Path, int]:
    """A new hidden folder beside `path` and an open descriptor holding its lock.

    The lock is on the folder, not on the file: safetensors replaces the file it writes.
    """
    while True:
        folder = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', suffix=TEMPORARY_SUFFIX,
                                       dir=path.parent))
        fd = os.open(folder, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            return folder, fd
        os.close(fd)     # another save took it for stale before we locked it: take a new one


def _remove_stale_temporaries(path: Path) -> None:
    """Deletes the temporary folders of earlier saves to `path` that died before finishing."""
    if fcntl is None:
        return     # without locks a dead save's folder cannot be told from a live one's
    pattern = re.compile(rf'\.{re.escape(path.name)}\.[^.]+{re.escape(TEMPORARY_SUFFIX)}')
    for candidate in path.parent.iterdir():
        if not pattern.fullmatch(candidate.name):
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue     # finished and deleted by its save meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(candidate)      # no save holds it: its writer is gone
        except OSError:
            pass         # a save in progress holds it (or it is not ours to delete)
        finally:
            os.close(fd)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable (POSIX); a crash after it keeps the new file.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint_folder(params: Mapping[str, Any], config: TransformerConfig,
                           folder: str | os.PathLike, *, tokenizer_file: str | os.PathLike) -> None:
    """Writes a checkpoint folder: `params` (`save_params`), `config` as config.json, and a copy
    of `tokenizer_file`; `gemma3n generate --checkpoint FOLDER` then runs it.

    config.json is the Hugging Face text config of `config` (`hf_config.config_from_hf` reads it
    back); its final logit softcap is `config`'s own, null for none. A config HF cannot describe
    is refused (`hf_config.check_representable`) before anything is written.
    """
    hf_config = folder_config(config)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    save_params(params, folder / FOLDER_PARAMS_FILE)
    write_folder_companions(folder, hf_config, tokenizer_file)


def folder_config(config: TransformerConfig) -> dict[str, Any]:
    """The config.json of a checkpoint folder for `config` (its final logit softcap `config`'s
    own, null for none); refuses a config HF cannot describe before anything is written."""
    hf_config = hf_text_config(config)
    hf_config['final_logit_softcapping'] = config.final_logit_softcap
    return hf_config


def write_folder_companions(folder: Path, hf_config: dict[str, Any],
                            tokenizer_file: str | os.PathLike | None) -> None:
    """config.json and a copy of `tokenizer_file` (None: none) written into checkpoint folder
    `folder`."""
    (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + '\n')
    if tokenizer_file is None:
        return
    tokenizer_copy = folder / FOLDER_TOKENIZER_FILE
    if Path(tokenizer_file).resolve() != tokenizer_copy.resolve():
        shutil.copyfile(tokenizer_file, tokenizer_copy)
