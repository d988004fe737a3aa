"""Shardings attached to the arrays of a compiled program: its inputs, its cache, its outputs.

The compiled prefill, step and train step are the single-device programs; on a mesh they only
gain constraints that pin where their arrays live, and the compiler's partitioner does the rest
(`jax.lax.with_sharding_constraint`). Pinning the cache makes each step's output cache land
where the next step expects it (no recompiles, no copies); pinning what goes back to the host
(tokens, logits) replicated lets every process read it whole. Without a mesh nothing changes.

Example:
    >>> on = MeshConstraints(mesh)
    >>> cache = on.constrain(out.cache, kv_cache.cache_axes(out.cache))    # inside jit
    >>> tokens = on.replicated(tokens)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma3n.sharding.rules import ShardingRules


def _map_named(fn: Callable[[Any, tuple], Any], tree: Any, names: Any) -> Any:
    """fn(leaf, axis names) over a nested dict `tree` and a dict `names` of the same keys."""
    flat = traverse_util.flatten_dict(tree)
    flat_names = traverse_util.flatten_dict(names, is_leaf=lambda _, x: isinstance(x, tuple))
    return traverse_util.unflatten_dict({k: fn(v, flat_names[k]) for k, v in flat.items()})


class MeshConstraints:
    """Where a program's arrays go on `mesh` by `rules`; with mesh None, nowhere special."""

    def __init__(self, mesh: Mesh | None, rules: ShardingRules = ShardingRules()):
        self.mesh = mesh
        self.rules = rules

    def sharding(self, names: tuple, shape: tuple[int, ...]) -> NamedSharding:
        return self.rules.sharding(names, shape, self.mesh)

    def constrain(self, tree: Any, names: Any) -> Any:
        """Inside jit: each array of the dict `tree` in the sharding of its axis names."""
        if self.mesh is None:
            return tree
        return _map_named(lambda x, n: jax.lax.with_sharding_constraint(
            x, self.sharding(n, x.shape)), tree, names)

    def shardings(self, tree: Any, names: Any) -> Any:
        """The shardings of the arrays (or shapes) of the dict `tree` (None without a mesh)."""
        if self.mesh is None:
            return None
        return _map_named(lambda x, n: self.sharding(n, x.shape), tree, names)

    def replicated(self, x: Any) -> Any:
        """Inside jit: `x` (any tree) whole on every device, readable by every process."""
        if self.mesh is None:
            return x
        whole = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, whole), x)
