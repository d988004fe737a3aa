"""Test helper: a small random `Gemma3nForConditionalGeneration` with both towers, saved with
`save_pretrained`, as the oracle of our released model (issue 16).

Not a test module. transformers builds the vision tower with timm (`TimmWrapperModel`, timm's
`mobilenetv5_300m_enc` with the small block list of test_mobilenet.py), imported with an
import-only stand-in for torchvision (torchvision_standin.py): every module of the oracle is
transformers' or timm's own code. The saved config.json gives the block list in timm's string
notation (what a user's config holds; timm itself is handed the decoded form).

The text vocabulary is 4096 (the packaged tokenizer's) + 8 vision + 8 audio hard tokens; the
markers are ordinary text ids, because the command inserts the model's own marker ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from gemma3n.checkpoints import hf_mapping
from gemma3n.checkpoints.hf_towers import PREPROCESSOR_FILE
from gemma3n.config import TransformerConfig
from hf_oracle import random_params
from test_audio_encoder import SMALL_HF_CONFIGS, randomize as randomize_audio
from test_mobilenet import SMALL, SMALL_ARCH, randomise as randomise_vision
from torchvision_standin import import_timm, timm_in_transformers

decode_arch_def = import_timm().models._efficientnet_builder.decode_arch_def

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


def _model_args(block_args) -> dict:
    return dict(block_args=block_args, stem_size=SMALL.stem_channels,
                msfa_output_resolution=SMALL.msfa_resolution)


def hf_config() -> transformers.Gemma3nConfig:
    text = hf_mapping.hf_text_config(TEXT_CONFIG, hf_vocab_size=HF_VOCAB)
    vision = transformers.Gemma3nVisionConfig(
        model_args=_model_args(decode_arch_def(SMALL_ARCH)),
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
    with timm_in_transformers():
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
    """`save_pretrained` (the block list in timm's notation), plus the image processor's size
    (768 in the released checkpoints)."""
    model.config.vision_config.model_args = _model_args(SMALL_ARCH)
    model.save_pretrained(directory)
    side = SMALL.image_size
    (directory / PREPROCESSOR_FILE).write_text(json.dumps({'size': {'height': side,
                                                                    'width': side}}))
