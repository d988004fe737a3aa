"""Building blocks shared by the decoder: norms, einsum weights, rotary embeddings, precision guards."""

from gemma3n.layers.einsum import (Einsum, QuantizedWeight, contract, dot, layout_param,
                                   project, record_layouts, serving_order, weight_init)
from gemma3n.layers.int4 import Int4Weight
from gemma3n.layers.norm import RMSNorm, rms_norm
from gemma3n.layers.precision import guard
from gemma3n.layers.rope import apply_rope

__all__ = ['Einsum', 'Int4Weight', 'QuantizedWeight', 'RMSNorm', 'apply_rope', 'contract', 'dot', 'guard',
           'layout_param', 'project', 'record_layouts', 'rms_norm', 'serving_order', 'weight_init']
