"""Gemma 3n over a device mesh: rules from logical axes to mesh axes, meshes, several processes.

The package sits with the building blocks: it knows logical axis names and JAX's sharding API,
not the model. Loading straight into shards is `gemma3n.checkpoints.placement`.

Example:
    >>> mesh = make_mesh('data=2,tensor=4')
    >>> params = shard_params(params, weight_schema(model, tokens), mesh)
    >>> Sampler(model=model, params=params, tokenizer=tokenizer)   # runs on the mesh
"""

from gemma3n.sharding.constraints import MeshConstraints
from gemma3n.sharding.distributed import ProcessGroup, initialize, process_group
from gemma3n.sharding.mesh import DATA, FSDP, MESH_AXES, TENSOR, describe_mesh, make_mesh, parse_mesh_spec
from gemma3n.sharding.params import param_shardings, place_blocks, shard_params
from gemma3n.sharding.rules import DEFAULT_RULES, ShardingRules, mesh_of

__all__ = ['DATA', 'DEFAULT_RULES', 'FSDP', 'MESH_AXES', 'MeshConstraints', 'ProcessGroup', 'ShardingRules',
           'TENSOR', 'describe_mesh', 'initialize', 'make_mesh', 'mesh_of', 'param_shardings',
           'parse_mesh_spec', 'place_blocks', 'process_group', 'shard_params']
