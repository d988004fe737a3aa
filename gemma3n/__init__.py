"""gemma3n: Google's Gemma 3n (E4B, E2B) in JAX/Flax."""

from gemma3n.config import (AttentionType, KVCacheSharingConfig, QueryPreAttentionNormalisation,
                            TransformerConfig)
from gemma3n.models import Gemma3n_E2B, Gemma3n_E4B
from gemma3n.transformer import Gemma3nTransformer, ModelInfo, Output

__all__ = [
    'AttentionType', 'Gemma3nTransformer', 'Gemma3n_E2B', 'Gemma3n_E4B', 'KVCacheSharingConfig',
    'ModelInfo', 'Output', 'QueryPreAttentionNormalisation', 'TransformerConfig',
]
