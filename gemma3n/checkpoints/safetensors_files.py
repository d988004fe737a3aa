"""Lazy, one-tensor-at-a-time reading of one or more safetensors files.

Each read copies one tensor from the file into a fresh array with positioned reads (no memory
map: mapped pages count as resident once touched), so resident memory holds the tensors already
loaded plus one. The arrays are aligned for the JAX CPU device to adopt without another copy
(`gemma3n.host_arrays`). Corrupted or truncated files are reported by name when they are opened.

safetensors validates a file (`safe_open`) but has no public API for a tensor's byte position,
so that is taken from the file's header (8-byte little-endian length + JSON, as the format
specifies) after `safe_open` has accepted it.

Example:
    >>> files = SafetensorsFiles([Path('model-00001-of-00002.safetensors'), ...])
    >>> files.keys()[:2], files.read('model.language_model.norm.weight').shape
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from gemma3n.host_arrays import aligned_empty

NUMPY_FRAMEWORK = 'numpy'
HEADER_LENGTH_BYTES = 8          # the JSON header's length as a little-endian u64
HEADER_LENGTH_FORMAT = '<Q'
METADATA_KEY = '__metadata__'
_DTYPES = {'BF16': np.dtype(ml_dtypes.bfloat16), 'F16': np.dtype(np.float16), 'F32': np.dtype(np.float32),
           'F64': np.dtype(np.float64), 'I8': np.dtype(np.int8), 'I16': np.dtype(np.int16),
           'I32': np.dtype(np.int32), 'I64': np.dtype(np.int64), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(bool)}
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}     # what a header calls a dtype


@dataclasses.dataclass(frozen=True)
class TensorSpan:
    """Where one tensor lies: its file, the byte position of its data, shape and dtype name."""
    file: Path
    position: int
    shape: tuple[int, ...]
    dtype: str


def read_into(reader: BinaryIO, buffer: np.ndarray, position: int, what: str) -> None:
    """Fills `buffer` with the bytes of `reader` from `position` on; ValueError naming `what`
    when the file ends first."""
    view = memoryview(buffer.reshape(-1).view(np.uint8))
    while view:
        reader.seek(position)
        count = reader.readinto(view)
        if not count:
            raise ValueError(f'{what} ends early (truncated file?).')
        view, position = view[count:], position + count


class SafetensorsFiles:
    """Tensor name -> file over several safetensors files, reading tensors on demand.

    Example:
        >>> files = SafetensorsFiles([Path('params.safetensors')])
        >>> x = files.read('final_norm/scale')      # np.ndarray, owned copy
    """

    def __init__(self, paths: Iterable[Path]):
        self._spans: dict[str, TensorSpan] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for path in paths:
            with self._open(path) as f:
                self.metadata[path] = f.metadata() or {}
            for key, span in _header_spans(path).items():
                if key in self._spans:
                    raise ValueError(f'Tensor {key} is stored twice: in {self._spans[key].file} and {path}.')
                self._spans[key] = span

    @staticmethod
    def _open(path: Path):
        if not path.is_file():
            raise FileNotFoundError(f'Safetensors file not found: {path}')
        try:
            return safe_open(str(path), framework=NUMPY_FRAMEWORK)
        except SafetensorError as err:
            raise ValueError(f'{path} is not a readable safetensors file (truncated or corrupted?): {err}') from err

    def keys(self) -> list[str]:
        return list(self._spans)

    def __contains__(self, key: str) -> bool:
        return key in self._spans

    def file_of(self, key: str) -> Path:
        return self._spans[key].file

    def span(self, key: str) -> TensorSpan:
        return self._spans[key]

    def shape_and_dtype(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """Header information of one tensor, without reading its data."""
        span = self._spans[key]
        if span.dtype not in _DTYPES:
            raise ValueError(f'Tensor {key} in {span.file} has dtype {span.dtype}, which this loader does not read.')
        return span.shape, _DTYPES[span.dtype]

    def read(self, key: str) -> np.ndarray:
        """One tensor as an in-memory array, aligned for the device to adopt."""
        shape, dtype = self.shape_and_dtype(key)
        span = self._spans[key]
        out = aligned_empty(shape, dtype)
        with open(span.file, 'rb', buffering=0) as reader:
            read_into(reader, out, span.position, f'{span.file}, inside tensor {key},')
        return out

    def read_block(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` (one slice of step 1 per leading dimension) of one tensor, reading
        only its bytes: one positioned read per run of it that is contiguous in the file."""
        shape, dtype = self.shape_and_dtype(key)
        span = self._spans[key]
        bounds = [s.indices(n) for s, n in zip(index, shape)]
        if any(step != 1 for _, _, step in bounds):
            raise ValueError(f'{key}: a block is read with slices of step 1, got {index}.')
        bounds = [(start, stop) for start, stop, _ in bounds] + [(0, n) for n in shape[len(bounds):]]
        out = aligned_empty(tuple(stop - start for start, stop in bounds), dtype)
        if not out.size:
            return out
        # Dimensions after the last one cut are whole: each combination of indices before it
        # starts one contiguous run.
        cut = max((i for i, (start, stop) in enumerate(bounds) if (start, stop) != (0, shape[i])),
                  default=0)
        strides = [math.prod(shape[i + 1:]) * dtype.itemsize for i in range(len(shape))]
        runs = out.reshape(-1, math.prod(out.shape[cut:]))
        with open(span.file, 'rb', buffering=0) as reader:
            for row, outer in enumerate(np.ndindex(*out.shape[:cut])):
                first = (bounds[i][0] + (outer[i] if i < cut else 0) for i in range(cut + 1))
                position = span.position + sum(i * stride for i, stride in zip(first, strides))
                read_into(reader, runs[row], position, f'{span.file}, inside tensor {key},')
        return out

    def describe(self, key: str) -> str:
        span = self._spans.get(key)
        return f'{key} (in {span.file if span else "no file"})'


def _header_spans(path: Path) -> dict[str, TensorSpan]:
    """Every tensor's span in the (safe_open-validated) file at `path`."""
    with open(path, 'rb') as f:
        (header_length,) = struct.unpack(HEADER_LENGTH_FORMAT, f.read(HEADER_LENGTH_BYTES))
        header = json.loads(f.read(header_length))
    data_start = HEADER_LENGTH_BYTES + header_length
    spans = {}
    for key, info in header.items():
        if key == METADATA_KEY:
            continue
        begin, end = info['data_offsets']
        shape = tuple(int(n) for n in info['shape'])
        itemsize = _DTYPES[info['dtype']].itemsize if info['dtype'] in _DTYPES else None
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise ValueError(f'Tensor {key} in {path} spans {end - begin} bytes, expected '
                             f'{math.prod(shape) * itemsize} for {shape} {info["dtype"]}.')
        spans[key] = TensorSpan(path, data_start + begin, shape, info['dtype'])
    return spans
