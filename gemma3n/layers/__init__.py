"""Building blocks shared by the decoder: norms, einsum weights, rotary embeddings, precision guards."""

from gemma3n.layers.einsum import Einsum, weight_init
from gemma3n.layers.norm import RMSNorm, rms_norm
from gemma3n.layers.precision import guard
from gemma3n.layers.rope import apply_rope

__all__ = ['Einsum', 'RMSNorm', 'apply_rope', 'guard', 'rms_norm', 'weight_init']
