"""Lazy, one-tensor-at-a-time reading of one or more safetensors files.

Each read maps the file, copies one tensor out and unmaps it again, so resident memory holds the
tensors already loaded plus one, never the mapped file (mapped pages count as resident once
touched). Corrupted or truncated files are reported by name when they are opened.

Example:
    >>> files = SafetensorsFiles([Path('model-00001-of-00002.safetensors'), ...])
    >>> files.keys()[:2], files.read('model.language_model.norm.weight').shape
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

NUMPY_FRAMEWORK = 'numpy'   # safetensors reads bfloat16 into ml_dtypes.bfloat16 arrays with it
_DTYPES = {'BF16': np.dtype(ml_dtypes.bfloat16), 'F16': np.dtype(np.float16), 'F32': np.dtype(np.float32),
           'F64': np.dtype(np.float64), 'I8': np.dtype(np.int8), 'I16': np.dtype(np.int16),
           'I32': np.dtype(np.int32), 'I64': np.dtype(np.int64), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(bool)}


class SafetensorsFiles:
    """Tensor name -> file over several safetensors files, reading tensors on demand.

    Example:
        >>> files = SafetensorsFiles([Path('params.safetensors')])
        >>> x = files.read('final_norm/scale')      # np.ndarray, owned copy
    """

    def __init__(self, paths: Iterable[Path]):
        self._file_of: dict[str, Path] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for path in paths:
            with self._open(path) as f:
                self.metadata[path] = f.metadata() or {}
                for key in f.keys():
                    if key in self._file_of:
                        raise ValueError(f'Tensor {key} is stored twice: in {self._file_of[key]} and {path}.')
                    self._file_of[key] = path

    @staticmethod
    def _open(path: Path):
        if not path.is_file():
            raise FileNotFoundError(f'Safetensors file not found: {path}')
        try:
            return safe_open(str(path), framework=NUMPY_FRAMEWORK)
        except SafetensorError as err:
            raise ValueError(f'{path} is not a readable safetensors file (truncated or corrupted?): {err}') from err

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def shape_and_dtype(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """Header information of one tensor, without reading its data."""
        path = self._file_of[key]
        with self._open(path) as f:
            view = f.get_slice(key)
            shape, dtype = tuple(view.get_shape()), view.get_dtype()
        if dtype not in _DTYPES:
            raise ValueError(f'Tensor {key} in {path} has dtype {dtype}, which this loader does not read.')
        return shape, _DTYPES[dtype]

    def read(self, key: str) -> np.ndarray:
        """One tensor as an in-memory array (the file is unmapped afterwards)."""
        path = self._file_of[key]
        with self._open(path) as f:
            try:
                return f.get_tensor(key)
            except (SafetensorError, TypeError) as err:
                raise ValueError(f'Cannot read tensor {key} from {path}: {err}') from err

    def describe(self, key: str) -> str:
        return f'{key} (in {self._file_of.get(key, "no file")})'
