"""Building blocks shared by the decoder: norms, einsum weights, rotary embeddings, precision
guards, weight declarations."""

from gemma3n.layers.einsum import (Einsum, QuantizedWeight, contract, dot, layout_param, project,
                                   weight_init)
from gemma3n.layers.norm import RMSNorm, rms_norm
from gemma3n.layers.precision import guard
from gemma3n.layers.rope import apply_rope
from gemma3n.layers.weights import WeightInfo, declare, serving_order, weight_schema

__all__ = ['Einsum', 'QuantizedWeight', 'RMSNorm', 'WeightInfo', 'apply_rope', 'contract', 'declare',
           'dot', 'guard', 'layout_param', 'project', 'rms_norm', 'serving_order', 'weight_init',
           'weight_schema']
