"""Sharding rules: which mesh axes split each logical axis of a weight, a cache or a batch.

A weight's dimensions carry logical names (`gemma3n.layers.axes`); a rule maps a name to the
mesh axes (`gemma3n.sharding.mesh`) that split it, tried in order:

| logical axis | mesh axes | why |
|---|---|---|
| batch | data, fsdp | each device runs its own rows of the batch |
| vocab | tensor, fsdp | the 262144-row embedding / tied head and the per-layer table, by rows |
| q_heads, kv_heads | tensor | attention runs per head: no communication inside it |
| mlp | tensor | the FFN's gate/up split by output, the down projection by input |
| embed | fsdp | FSDP: every large weight split along the model width, gathered when used |

A mesh axis splits at most one dimension of an array (the first that asks for it), and a
mesh lacking an axis simply drops it. Weights smaller than `min_size` values stay whole:
splitting them saves no memory and costs a collective each. Where the mesh axes do not divide
a dimension (E4B's 2 K/V heads over tensor=4), the longest leading run of them that does is
used, down to none (replicated); a one-line note says so, once per case.

Example:
    >>> rules = ShardingRules()
    >>> rules.spec(('vocab', 'embed'), (262144, 2048), {'fsdp': 4, 'tensor': 2})
    PartitionSpec(('tensor', 'fsdp'), None)
    >>> rules.spec(('kv', 'kv_heads', 'embed', 'head_dim'), (2, 2, 2048, 256), {'tensor': 4})
    PartitionSpec(None, None, None, None)          # 2 heads over 4 devices: replicated, noted
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma3n.layers import axes
from gemma3n.sharding.mesh import DATA, FSDP, TENSOR

# Smallest weight (in values) that is split: E4B's norms and AltUp coefficients stay whole,
# its projections (2048 x 256 and up) are split.
MIN_SHARDED_SIZE = 1 << 16

DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (axes.BATCH, (DATA, FSDP)),
    (axes.VOCAB, (TENSOR, FSDP)),
    (axes.Q_HEADS, (TENSOR,)),
    (axes.KV_HEADS, (TENSOR,)),
    (axes.MLP, (TENSOR,)),
    (axes.EMBED, (FSDP,)),
)

logger = logging.getLogger(__name__)
_noted: set[tuple[str, int, tuple[str, ...]]] = set()


def _note_unsplit(name: str, size: int, wanted: tuple[str, ...], used: tuple[str, ...],
                  mesh_shape: Mapping[str, int]) -> None:
    """Logs once per (axis, size, mesh axes) that a rule was not applied in full."""
    key = (name, size, wanted)
    if key in _noted:
        return
    _noted.add(key)
    over = ' x '.join(f'{m}={mesh_shape[m]}' for m in wanted)
    kept = f'split over {" x ".join(used)} only' if used else 'replicated'
    logger.warning('sharding: %s of size %d does not divide over %s: %s.', name, size, over, kept)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """A rule table (logical axis -> mesh axes, tried in order) and the smallest split weight."""
    table: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES
    min_size: int = MIN_SHARDED_SIZE

    def spec(self, names: Sequence[str | None], shape: Sequence[int],
             mesh_shape: Mapping[str, int]) -> PartitionSpec:
        """The PartitionSpec of an array of `shape` whose dimensions are named `names`
        (None: a dimension no rule splits) on a mesh of `mesh_shape` {axis: size}."""
        if len(names) != len(shape):
            raise ValueError(f'{len(names)} axis names {tuple(names)} for shape {tuple(shape)}.')
        if math.prod(shape) < self.min_size and axes.BATCH not in names:
            return PartitionSpec(*([None] * len(shape)))
        table = dict(self.table)
        taken: set[str] = set()
        entries = []
        for name, size in zip(names, shape):
            wanted = tuple(m for m in table.get(name, ()) if m in mesh_shape and m not in taken
                           and mesh_shape[m] > 1)
            used = wanted
            while used and size % math.prod(mesh_shape[m] for m in used):
                used = used[:-1]
            if used != wanted:
                _note_unsplit(name, size, wanted, used, mesh_shape)
            taken.update(used)
            entries.append(None if not used else used[0] if len(used) == 1 else used)
        return PartitionSpec(*entries)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int],
                 mesh: Mesh) -> NamedSharding:
        return NamedSharding(mesh, self.spec(names, shape, dict(mesh.shape)))


def stored_spec(spec: PartitionSpec, order: Sequence[int] | None) -> PartitionSpec:
    """The spec of a weight stored with its checkpoint axes permuted to `order` (None: as is):
    each stored dimension keeps the split of the checkpoint dimension it holds."""
    if order is None:
        return spec
    entries = tuple(spec) + (None,) * (len(order) - len(spec))
    return PartitionSpec(*(entries[i] for i in order))


def mesh_of(tree) -> Mesh | None:
    """The mesh the leaves of `tree` are placed on (None: none is on a multi-device mesh)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, 'sharding', None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None
