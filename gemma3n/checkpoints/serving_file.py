"""The file of a converted checkpoint (`gemma3n convert`): safetensors whose tensors are the
serving layout's arrays as they lie in memory, read back by memory-mapping it.

What the tensors are (which leaf of which weight) is `gemma3n.converted`'s business; this module
only writes and maps the file. The writer streams one tensor at a time (the per-layer table in
chunks of rows), so writing needs no second copy of the model, and lays every tensor whose size
is a multiple of DEVICE_ALIGNMENT bytes (all but a few small ones) on such a boundary of the file:
mapped, each is then an aligned host array that the JAX CPU device adopts without copying
(`gemma3n.host_arrays`). safetensors forbids gaps between tensors, so the header is padded with
spaces (as its format allows) and the unaligned sizes go last. The metadata names the format, its
version and what `gemma3n.converted` says it holds; a file of a newer version is refused.

Mapping reads nothing: pages come from the file (or the page cache) when first touched.
The mapping is private (copy on write), so a write into an adopted buffer can never reach the
file or fault.

Example:
    >>> write_serving_file(path, [Tensor('final_norm/scale', (2048,), np.float32, chunks)], meta)
    >>> metadata, arrays = map_serving_file(path)          # {key: np.ndarray over the mapping}
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gemma3n.checkpoints.native import FORMAT_KEY, VERSION_KEY, atomic_file, has_format
from gemma3n.checkpoints.safetensors_files import (DTYPE_NAMES, HEADER_LENGTH_FORMAT, METADATA_KEY,
                                                   SafetensorsFiles)
from gemma3n.host_arrays import DEVICE_ALIGNMENT

SERVING_FILE = 'serving.safetensors'           # the weights file of a converted folder
SERVING_FORMAT_NAME = 'gemma3n-serving'
SERVING_FORMAT_VERSION = '1'
HEADER_PADDING = b' '


class Tensor(NamedTuple):
    """One tensor to write: its key, shape, dtype and `chunks()`, its bytes in order as arrays."""
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def is_serving_file(files: SafetensorsFiles, path: Path) -> bool:
    """Whether `path` (opened as `files`) is a converted checkpoint; a newer version is an error."""
    return has_format(files, path, SERVING_FORMAT_NAME, SERVING_FORMAT_VERSION,
                      ': convert the original checkpoint again')


def write_serving_file(path: Path, tensors: Sequence[Tensor], metadata: dict[str, str]) -> None:
    """Writes `tensors` to `path` atomically (`native.atomic_file`), with `metadata` and the
    format's own keys in the header."""
    # Aligned sizes first: each then starts on a DEVICE_ALIGNMENT boundary of the file.
    ordered = sorted(tensors, key=lambda t: t.nbytes % DEVICE_ALIGNMENT != 0)
    header: dict[str, Any] = {METADATA_KEY: {**metadata, FORMAT_KEY: SERVING_FORMAT_NAME,
                                             VERSION_KEY: SERVING_FORMAT_VERSION}}
    offset = 0
    for tensor in ordered:
        header[tensor.key] = {'dtype': DTYPE_NAMES[np.dtype(tensor.dtype)],
                              'shape': list(tensor.shape),
                              'data_offsets': [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(header, separators=(',', ':')).encode()
    length_bytes = struct.calcsize(HEADER_LENGTH_FORMAT)
    text += HEADER_PADDING * (-(length_bytes + len(text)) % DEVICE_ALIGNMENT)
    with atomic_file(path) as tmp_name, open(tmp_name, 'wb') as out:
        out.write(struct.pack(HEADER_LENGTH_FORMAT, len(text)))
        out.write(text)
        for tensor in ordered:
            written = 0
            for chunk in tensor.chunks():
                chunk = np.ascontiguousarray(chunk, dtype=tensor.dtype)
                out.write(memoryview(chunk.reshape(-1).view(np.uint8)))
                written += chunk.nbytes
            if written != tensor.nbytes:
                raise ValueError(f'{tensor.key}: {written} bytes given for {tensor.shape} '
                                 f'{np.dtype(tensor.dtype).name} ({tensor.nbytes} bytes).')


def map_serving_file(path: Path, *, read_lazily: Collection[str] = ()
                     ) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, {key: array}) of the file at `path`, every array a view of one private
    mapping of it. The file is validated first (`SafetensorsFiles`: a cut or damaged file is
    refused, naming it). Nothing is read here, but the kernel is asked to read every tensor
    except those `read_lazily` ahead, in the background (MADV_WILLNEED): pages the page cache
    lost are then on their way while the caller traces the model, not read one fault at a
    time by the first prefill."""
    files = SafetensorsFiles([path])
    with open(path, 'rb') as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    arrays = {}
    for key in files.keys():
        shape, dtype = files.shape_and_dtype(key)
        start = files.span(key).position
        arrays[key] = np.frombuffer(mapping, dtype, math.prod(shape), start).reshape(shape)
        if key not in read_lazily and arrays[key].nbytes and hasattr(mapping, 'madvise'):
            page_start = start - start % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_WILLNEED, page_start, start + arrays[key].nbytes - page_start)
    return files.metadata[path], arrays
