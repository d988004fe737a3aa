"""Test helper: a small random `Gemma3nForConditionalGeneration` with both towers, saved with
`save_pretrained`, as the oracle of our released model (issue 16).

Not a test module. transformers builds the vision tower with timm (`TimmWrapperModel`), and timm
cannot be imported here (it needs torchvision, whose CPU wheels do not load beside our torch).
So the HF model is built with its vision tower swapped for `OurVisionTower`: a torch module that
holds the tower's tensors under timm's names and shapes (so `save_pretrained` writes them where
the released checkpoints have them) and computes its soft tokens with our `MobileNetV5` on those
tensors. That our tower computes what timm's does is checked on its own (test_mobilenet_timm.py,
where timm imports); everything after it (the vision embedder, the merge into the token stream,
the audio tower and embedder, their padding, the per-layer inputs, the decoder) is HF's own code.

The text vocabulary is 4096 (the packaged tokenizer's) + 8 vision + 8 audio hard tokens; the
markers are ordinary text ids, because the command inserts the model's own marker ids.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import torch
import transformers
from transformers.models.gemma3n import modeling_gemma3n

from gemma3n.checkpoints import hf_mapping, hf_mobilenet
from gemma3n.checkpoints.hf_towers import PREPROCESSOR_FILE
from gemma3n.config import TransformerConfig
from gemma3n.vision.mobilenet import config as mnv5
from gemma3n.vision.mobilenet.encoder import MobileNetV5
from hf_oracle import random_params
from test_audio_encoder import SMALL_HF_CONFIGS, randomize as randomize_audio
from test_mobilenet import SMALL, SMALL_ARCH, hf_layout, randomise as randomise_vision

TEXT_VOCAB = 4096
HARD_TOKENS = 8                      # per tower
VISION_OFFSET = TEXT_VOCAB
AUDIO_OFFSET = TEXT_VOCAB + HARD_TOKENS
HF_VOCAB = TEXT_VOCAB + 2 * HARD_TOKENS
BOI, BOA = 4000, 4001                # <start_of_image>, <start_of_audio>: text ids
EOI, IMAGE_TOKEN = VISION_OFFSET, VISION_OFFSET + 1
EOA, AUDIO_TOKEN = AUDIO_OFFSET, AUDIO_OFFSET + 1
AUDIO_SOFT_TOKENS = 8                # what a clip's block holds (a 0.6 s clip makes 4)
MEL_BINS = 128                       # the feature extractor's
# Every mechanism of the decoder (see hf_oracle.small_configs), at the tokenizer's vocabulary.
TEXT_CONFIG = TransformerConfig.gemma3n(
    num_layers=10, num_shared_layers=5, num_sparse_layers=3, embed_dim=32, hidden_dim=1024,
    num_heads=4, num_kv_heads=2, head_dim=16, num_embed=TEXT_VOCAB, per_layer_input_dim=8,
    laurel_rank=4, sliding_window_size=8)


def _child(module: torch.nn.Module, name: str) -> torch.nn.Module:
    if name not in module._modules:
        module.add_module(name, torch.nn.Module())
    return module._modules[name]


class OurVisionTower(torch.nn.Module):
    """Stands in for `TimmWrapperModel`: timm's tensor names, our tower's computation."""

    def __init__(self, config: mnv5.MobileNetConfig):
        super().__init__()
        self.tower_config = config
        self.timm_model = torch.nn.Module()
        for path, shape in hf_mobilenet.vision_tower_shapes(config).items():
            *modules, leaf = hf_mobilenet.hf_name(path).split('.')
            owner = self.timm_model
            for name in modules:
                owner = _child(owner, name)
            owner.register_parameter(leaf, torch.nn.Parameter(torch.zeros(hf_layout(shape))))
        self._apply_tower = jax.jit(MobileNetV5(config).apply)

    def forward(self, pixel_values, do_pooling=False, return_dict=True, **kwargs):
        state = {hf_mobilenet.HF_VISION_TOWER_PREFIX + key: value.detach().numpy()
                 for key, value in self.timm_model.state_dict().items()}
        params = hf_mobilenet.vision_tower_from_hf(state, self.tower_config)
        pixels = pixel_values.detach().numpy().transpose(0, 2, 3, 1)
        tokens = np.asarray(self._apply_tower({'params': params}, pixels))   # [B, T, C]
        side = self.tower_config.msfa_resolution
        grid = tokens.transpose(0, 2, 1).reshape(tokens.shape[0], -1, side, side)
        return types.SimpleNamespace(last_hidden_state=torch.from_numpy(np.ascontiguousarray(grid)))


class _AutoModelWithOurVision:
    @staticmethod
    def from_config(config, **kwargs):
        if isinstance(config, transformers.Gemma3nVisionConfig):
            return OurVisionTower(SMALL)
        return transformers.AutoModel.from_config(config, **kwargs)


def hf_config() -> transformers.Gemma3nConfig:
    text = hf_mapping.hf_text_config(TEXT_CONFIG, hf_vocab_size=HF_VOCAB)
    vision = transformers.Gemma3nVisionConfig(
        model_args=dict(block_args=SMALL_ARCH, stem_size=SMALL.stem_channels,
                        msfa_output_resolution=SMALL.msfa_resolution),
        vocab_offset=VISION_OFFSET, vocab_size=HARD_TOKENS)
    audio = transformers.Gemma3nAudioConfig(
        **{**SMALL_HF_CONFIGS['causal'], 'input_feat_size': MEL_BINS},
        vocab_offset=AUDIO_OFFSET, vocab_size=HARD_TOKENS)
    return transformers.Gemma3nConfig(
        text_config=text, vision_config=vision.to_dict(), audio_config=audio.to_dict(),
        vision_soft_tokens_per_image=SMALL.num_soft_tokens,
        audio_soft_tokens_per_image=AUDIO_SOFT_TOKENS, boi_token_id=BOI, eoi_token_id=EOI,
        image_token_id=IMAGE_TOKEN, boa_token_id=BOA, eoa_token_id=EOA,
        audio_token_id=AUDIO_TOKEN, attn_implementation='eager')


def make_hf_model(seed: int = 0) -> transformers.Gemma3nForConditionalGeneration:
    """The float32 eval-mode model with random weights: text as hf_oracle makes them, towers and
    embedders as their own tests do (every branch carries signal)."""
    with mock.patch.object(modeling_gemma3n, 'AutoModel', _AutoModelWithOurVision):
        model = transformers.Gemma3nForConditionalGeneration(hf_config()).to(torch.float32).eval()
    text = hf_mapping.params_to_hf(random_params(TEXT_CONFIG, seed), TEXT_CONFIG,
                                   prefix='model.language_model.', hf_vocab_size=HF_VOCAB)
    result = model.load_state_dict({k: torch.from_numpy(v) for k, v in text.items()}, strict=False)
    assert not result.unexpected_keys
    inner = model.model
    randomise_vision(inner.vision_tower, seed + 1)
    randomise_vision(inner.embed_vision, seed + 2)
    randomize_audio(inner.audio_tower, seed + 3)
    randomize_audio(inner.embed_audio, seed + 4)
    return model


def save_checkpoint(model: transformers.Gemma3nForConditionalGeneration, directory: Path) -> None:
    """`save_pretrained`, plus the image processor's size (768 in the released checkpoints)."""
    model.save_pretrained(directory)
    side = SMALL.image_size
    (directory / PREPROCESSOR_FILE).write_text(json.dumps({'size': {'height': side,
                                                                    'width': side}}))
