"""Building blocks shared by the decoder: norms, projection weights and their stored
representations, rotary embeddings, precision guards, weight declarations."""

from gemma3n.layers.einsum import (Einsum, ServingWeight, StackedWeight, StoredWeight, contract,
                                   dot, lookup, project, projection_param, weight_init)
from gemma3n.layers.int4 import Int4Weight
from gemma3n.layers.int8 import QuantizedWeight
from gemma3n.layers.norm import RMSNorm, rms_norm
from gemma3n.layers.precision import guard
from gemma3n.layers.rope import apply_rope
from gemma3n.layers.weights import WeightInfo, declare, serving_order, weight_schema

__all__ = ['Einsum', 'Int4Weight', 'QuantizedWeight', 'RMSNorm', 'ServingWeight', 'StackedWeight',
           'StoredWeight', 'WeightInfo',
           'apply_rope', 'contract', 'declare', 'dot', 'guard', 'lookup', 'project',
           'projection_param', 'rms_norm', 'serving_order', 'weight_init', 'weight_schema']
