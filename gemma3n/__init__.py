"""gemma3n: Google's Gemma 3n (E4B, E2B) in JAX/Flax."""

from gemma3n import checkpoints, layout, memory
from gemma3n.checkpoints import load_params, open_per_layer_table, save_params
from gemma3n.loaded_model import LoadedModel
from gemma3n.load_error import LoadError
from gemma3n.loading import load
from gemma3n.config import (AttentionType, KVCacheSharingConfig, QueryPreAttentionNormalisation,
                            TransformerConfig)
from gemma3n.memory import InsufficientMemoryError
from gemma3n.models import Gemma3n_E2B, Gemma3n_E4B
from gemma3n.transformer import Gemma3nTransformer, ModelInfo, Output
from gemma3n.text import (ChatSampler, Greedy, RandomSampling, Sampler, SamplerOutput,
                          SamplerState, Tokenizer, TopkSampling, TopPSampling)
from gemma3n.vision import SigLiPFromPatches, ViTModel, VisionExit

__all__ = [
    'AttentionType', 'ChatSampler', 'Gemma3nTransformer', 'Gemma3n_E2B', 'Gemma3n_E4B', 'KVCacheSharingConfig',
    'Greedy', 'InsufficientMemoryError', 'LoadError', 'LoadedModel', 'ModelInfo', 'Output', 'QueryPreAttentionNormalisation',
    'RandomSampling', 'Sampler', 'SamplerOutput', 'SamplerState', 'SigLiPFromPatches', 'Tokenizer',
    'TopPSampling', 'TopkSampling', 'TransformerConfig', 'ViTModel', 'VisionExit', 'checkpoints',
    'layout', 'load', 'load_params', 'memory', 'open_per_layer_table', 'save_params',
]
