"""Hugging Face names of the audio tower and the audio embedder: config fields and weights.

The weights are declared once, in `gemma3n.audio` (`weight_schema` lists them with shapes and
logical axes) and keep the checkpoint's axis order, so mapping a checkpoint is renaming:

    ours  conformer_3/attention/attn/q_proj/w      HF  conformer.3.attention.attn.q_proj.weight
    ours  subsample_conv_projection/conv_0/norm/scale
                                                   HF  subsample_conv_projection.conv_0.norm.weight
    ours  embedding  (embedder)                    HF  embedding.weight

HF keys sit under a prefix: `model.audio_tower.` / `model.embed_audio.` in the released
checkpoint files and in `Gemma3nForConditionalGeneration.state_dict()`; none for a standalone
`Gemma3nAudioEncoder` / `Gemma3nMultimodalEmbedder`.

Example:
    >>> config = audio_config_from_hf(json.load(open('config.json'))['audio_config'])
    >>> schema = weight_schema(AudioEncoder(config), mel, valid)
    >>> params = params_from_hf(state, schema, prefix=AUDIO_TOWER_PREFIX)
    >>> embedder = audio_embedder(config, text_width=2048)
    >>> embed = params_from_hf(state, weight_schema(embedder, ids, soft), prefix=EMBED_AUDIO_PREFIX)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gemma3n.audio.config import AudioConfig
from gemma3n.checkpoints.hf_tensors import Stored, read_params
from gemma3n.layers.weights import WeightInfo
from gemma3n.towers import audio_embedder  # noqa: F401 (where users of this module found it)

AUDIO_TOWER_PREFIX = 'model.audio_tower.'
EMBED_AUDIO_PREFIX = 'model.embed_audio.'
HF_WEIGHT = 'weight'
# Our leaf names that HF calls `weight` (projections, norms, convolutions).
WEIGHT_LEAVES = ('w', 'scale', 'kernel')
# The embedder's table is a leaf of ours but an `nn.Embedding` module of HF's.
EMBEDDING_LEAF = 'embedding'
LAYER = re.compile(r'^conformer_(\d+)/')
# Our config field <- HF `Gemma3nAudioConfig` field.
CONFIG_FIELDS = {
    'hidden_size': 'hidden_size',
    'num_layers': 'conf_num_hidden_layers',
    'num_heads': 'conf_num_attention_heads',
    'input_feat_size': 'input_feat_size',
    'chunk_size': 'conf_attention_chunk_size',
    'context_left': 'conf_attention_context_left',
    'context_right': 'conf_attention_context_right',
    'logit_cap': 'conf_attention_logit_cap',
    'conv_kernel_size': 'conf_conv_kernel_size',
    'reduction_factor': 'conf_reduction_factor',
    'residual_weight': 'conf_residual_weight',
    'gradient_clipping': 'gradient_clipping',
    'rms_norm_eps': 'rms_norm_eps',
    'sscp_channels': 'sscp_conv_channel_size',
    'sscp_kernels': 'sscp_conv_kernel_size',
    'sscp_strides': 'sscp_conv_stride_size',
    'sscp_group_norm_eps': 'sscp_conv_group_norm_eps',
    'vocab_size': 'vocab_size',
    'vocab_offset': 'vocab_offset',
}


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def audio_config_from_hf(hf_config: Mapping[str, Any]) -> AudioConfig:
    """Our AudioConfig from a `Gemma3nAudioConfig` dict (config.json's `audio_config`); fields
    it leaves out keep the released values."""
    return AudioConfig(**{ours: _tuples(hf_config[theirs])
                          for ours, theirs in CONFIG_FIELDS.items() if theirs in hf_config})


def hf_name(path: str) -> str:
    """HF key (without prefix) of our '/'-joined weight path."""
    path = LAYER.sub(r'conformer.\1/', path)
    parts = path.split('/')
    if parts[-1] in WEIGHT_LEAVES:
        parts[-1] = HF_WEIGHT
    elif parts == [EMBEDDING_LEAF]:
        parts.append(HF_WEIGHT)
    return '.'.join(parts)


def params_from_hf(state: Mapping[str, Any], schema: Mapping[str, WeightInfo], *,
                   prefix: str = '', dtype: Any = None) -> dict[str, Any]:
    """Our nested params from HF tensors, every weight checked by name and shape.

    Args:
        state: HF key -> array (numpy or anything `np.asarray` reads, e.g. a CPU torch tensor
            via `.numpy()`); keys outside `prefix` are ignored.
        schema: `weight_schema` of the module the params are for.
        prefix: where the module's keys sit in `state`.
        dtype: cast every weight to this dtype (default: the schema's).
    Raises:
        ValueError naming every missing, unexpected or misshapen weight.
    """
    stored = {path: Stored(hf_name(path), info.shape, dtype or info.dtype)
              for path, info in schema.items()}
    return read_params(state, stored, prefix=prefix, what='audio')
