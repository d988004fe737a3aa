"""Test helper: Hugging Face `transformers` Gemma 3n as a numerical oracle for our decoder.

Not a test module. Builds small configs, random parameters of our tree shape (numpy only, no
model needed) and a float32 `Gemma3nForCausalLM` holding exactly those weights.

Example:
    >>> cfg = small_configs()[0]
    >>> params = random_params(cfg, seed=0)
    >>> hf = make_hf_causal_lm(cfg, params)
    >>> with torch.no_grad():
    ...     logits = hf(torch.tensor(tokens)).logits          # [B, L, num_embed]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import transformers

from gemma3n.checkpoints import hf_mapping
from gemma3n.config import TransformerConfig

# Random weights: norm scales 1 + SCALE_NOISE * N(0, 1) (non-degenerate, unlike gemma's zero init);
# weights N(0, 1 / fan_in) so activations keep unit scale and logits come out O(1-10).
SCALE_NOISE = 0.1
HF_PREFIX = 'model.'   # Gemma3nForCausalLM keeps the text model under `model.`
TIED_HEAD_KEY = 'lm_head.weight'


def small_configs() -> list[TransformerConfig]:
    """Three tiny Gemma 3n configs that together cover every mechanism HF and we must agree on.

    - every config: GQA (num_kv_heads < num_heads), KV sharing of both global and local consumers
      with the unshared count a multiple of the 5-layer pattern (so HF's "last unshared layer of the
      same kind" and our "n-1 global / n-2 local" pick the same source, docs/architecture.md §3),
      sliding window 8 (shorter than 24+ token test sequences), activation sparsity on the first layers.
    - they differ in width, depth, GQA ratio, sparse-layer count, RoPE scale and number of consumers.
    - hidden_dim is 1024, not tiny: gaussian top-k at 0.95 keeps ~5% of the FFN units, and with 64 units
      (3 survivors) some tokens' FFN output is nearly zero; post_ffw_norm then rescales it by up to 1e3,
      amplifying float32 rounding (ours and HF's alike) to ~1e-3 on the logits. With 1024 units (~51
      survivors, E4B keeps ~820) the two implementations agree to ~5e-5.
    """
    common: dict[str, Any] = dict(head_dim=16, per_layer_input_dim=8, laurel_rank=4, sliding_window_size=8)
    return [
            # 10 layers LLLLG x2: 5 shared (layers 5-9 read 3 (local) and 4 (global)).
            TransformerConfig.gemma3n(num_layers=10, num_shared_layers=5, num_sparse_layers=3, embed_dim=32,
                                      hidden_dim=1024, num_heads=4, num_kv_heads=2, num_embed=300, **common),
            # 15 layers: 10 unshared, 5 shared; 4:1 GQA as in E4B; linear RoPE scaling on global layers.
            TransformerConfig.gemma3n(num_layers=15, num_shared_layers=5, num_sparse_layers=2, embed_dim=64,
                                      hidden_dim=1024, num_heads=8, num_kv_heads=2, num_embed=400,
                                      global_scale_factor=2.0, **common),
            # 15 layers, only 5 unshared: 10 consumers (8 local read layer 3, 2 global read layer 4); 2:1 GQA.
            TransformerConfig.gemma3n(num_layers=15, num_shared_layers=10, num_sparse_layers=2, embed_dim=48,
                                      hidden_dim=1024, num_heads=6, num_kv_heads=3, num_embed=500, **common),
    ]


def random_params(config: TransformerConfig, seed: int) -> dict[str, Any]:
    """Random float32 params of our tree for `config` (nested dict of np.ndarray), numpy only."""
    rng = np.random.default_rng(seed)
    flat = {}
    for entry in hf_mapping.mapping_entries(config):
        noise = rng.standard_normal(entry.shape, dtype=np.float32)
        if entry.is_scale:
            flat[entry.path] = 1.0 + SCALE_NOISE * noise
        else:
            fan_in = int(np.prod([entry.shape[axis] for axis in entry.in_axes]))
            flat[entry.path] = noise / np.float32(np.sqrt(fan_in))
    return hf_mapping.unflatten_params(flat)


def hf_kv_source_layers(hf_config: transformers.Gemma3nTextConfig) -> tuple[int, ...]:
    """HF's rule: each KV-shared layer reads the last unshared layer of its own type."""
    first_shared = hf_config.num_hidden_layers - hf_config.num_kv_shared_layers
    types = hf_config.layer_types
    return tuple(i if i < first_shared else max(j for j in range(first_shared) if types[j] == types[i])
                 for i in range(len(types)))


def make_hf_causal_lm(
        config: TransformerConfig,
        params: dict[str, Any],
        *,
        hf_vocab_size: int | None = None,
) -> transformers.Gemma3nForCausalLM:
    """A float32, eval-mode, eager-attention `Gemma3nForCausalLM` holding `params` (strictly loaded).

    Final logit softcapping follows our config (disabled when ours is None). `hf_vocab_size` defaults
    to `num_embed`, so HF logits have the same [B, L, num_embed] shape as ours. Raises ValueError when
    HF's KV-sharing sources differ from ours for this config (the two would compute different models).
    """
    vocab = config.num_embed if hf_vocab_size is None else hf_vocab_size
    hf_config = transformers.Gemma3nTextConfig(**hf_mapping.hf_text_config(config, hf_vocab_size=vocab),
                                               attn_implementation='eager')
    # HF's strict config refuses None; the attribute is read at run time (docs/architecture.md §8).
    object.__setattr__(hf_config, 'final_logit_softcapping', config.final_logit_softcap)
    if hf_kv_source_layers(hf_config) != config.kv_source_layers():
        raise ValueError(f'HF reads K/V from layers {hf_kv_source_layers(hf_config)}, our config from '
                         f'{config.kv_source_layers()}: choose a config whose unshared layer count is a '
                         'multiple of the attention pattern.')
    model = transformers.Gemma3nForCausalLM(hf_config).to(torch.float32).eval()
    state = {key: torch.from_numpy(np.asarray(value, dtype=np.float32))
             for key, value in hf_mapping.params_to_hf(params, config, prefix=HF_PREFIX,
                                                       hf_vocab_size=vocab).items()}
    result = model.load_state_dict(state, strict=False)
    # The output head is tied to embed_tokens, so it is the only key we do not provide.
    if result.unexpected_keys or set(result.missing_keys) != {TIED_HEAD_KEY}:
        raise ValueError(f'HF model keys differ from the mapping: missing {result.missing_keys}, '
                         f'unexpected {result.unexpected_keys}.')
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise ValueError('HF output head is not tied to embed_tokens.')
    return model
