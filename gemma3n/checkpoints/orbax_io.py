"""Reference Orbax PyTree checkpoints: a directory whose tree is exactly our parameter tree.

Read with orbax-checkpoint's PyTreeCheckpointer: the tree's shapes and dtypes come from the
checkpoint metadata (nothing read), then only the requested leaves are restored, as numpy arrays
cast to the target dtype by Orbax itself.

Example:
    >>> catalog = orbax_catalog(Path('gemma3n_e4b'))          # {'layer_0/attn/q_einsum/w': ((8, 2048, 256), bf16)}
    >>> flat = orbax_restore(Path('gemma3n_e4b'), list(catalog), dtype=None)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params

# Files Orbax writes at the top of a PyTree checkpoint.
ORBAX_MARKERS = ('_METADATA', '_CHECKPOINT_METADATA', 'manifest.ocdbt')


def is_orbax_checkpoint(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in ORBAX_MARKERS)


def _checkpointer():
    # Imported on use: orbax pulls in jax and tensorstore, which the other formats do not need.
    import orbax.checkpoint as ocp

    return ocp, ocp.PyTreeCheckpointer()


def orbax_catalog(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """'/'-joined path -> (shape, dtype) of every array in the checkpoint, from its metadata."""
    _, checkpointer = _checkpointer()
    try:
        tree = checkpointer.metadata(path).item_metadata.tree
    except Exception as err:   # orbax/tensorstore raise many error types for unreadable metadata
        raise ValueError(f'{path}: cannot read the Orbax checkpoint metadata: {err}') from err
    flat = flatten_params(tree)
    return {name: (tuple(leaf.shape), np.dtype(leaf.dtype)) for name, leaf in flat.items()}


def orbax_restore(path: Path, paths: Sequence[str], dtype: Any) -> dict[str, np.ndarray]:
    """The arrays at `paths` as numpy arrays in `dtype` (None: as stored); other leaves are not read."""
    ocp, checkpointer = _checkpointer()
    try:
        metadata = flatten_params(checkpointer.metadata(path).item_metadata.tree)
        item = unflatten_params({name: metadata[name] for name in paths})
        restore_args = unflatten_params(
                {name: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype) for name in paths})
        restored = checkpointer.restore(
                path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    except Exception as err:   # tensorstore reports truncated/corrupted chunks with its own error types
        raise ValueError(f'{path}: cannot restore the Orbax checkpoint: {err}') from err
    return flatten_params(restored)
