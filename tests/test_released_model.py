"""The released towers wired into the model (issue 16), against transformers'
`Gemma3nForConditionalGeneration`: a small random checkpoint saved with `save_pretrained` loads
here with every tower, and the logits of prompts with an image and an audio clip match.

The HF model's vision tower computes with our MobileNet-V5 (timm cannot be imported here; see
released_oracle.py): this checks the vision embedder, the merge of both towers' soft tokens into
the token stream (positions, hard tokens, audio padding, per-layer inputs) and the decoder.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
import torch
import transformers
from PIL import Image

import gemma3n
from gemma3n import multimodal
from gemma3n.audio import log_mel_features
from gemma3n.audio.audio_file import AudioInputError
from gemma3n.checkpoints import load_params
from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.embedder import PER_LAYER_TABLE_PATH
from gemma3n.checkpoints.hf_towers import model_config_from_hf, towers_config_from_hf
from gemma3n.checkpoints.safetensors_hf import HFSoftcapWarning
from gemma3n.layout import to_serving
from gemma3n.models import e4b_config
from gemma3n.multimodal import BlockIds
from gemma3n.text.sampler import Sampler
from gemma3n.text.special_tokens import BOS
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
from gemma3n.towers import AudioInput
from gemma3n.towers_config import TowersConfig
from gemma3n.transformer import Gemma3nTransformer
from released_oracle import (AUDIO_SOFT_TOKENS, BOA, BOI, HF_VOCAB, TEXT_VOCAB, make_hf_model,
                             save_checkpoint)
from test_audio_features import tone_and_noise
from test_mobilenet import SMALL

# float32 on both sides, same weights; only summation order differs (XLA vs torch). Logits are
# up to ~5 here; measured max difference 4.5e-5. A wrong merge (an off-by-one block, a missing
# hard-token embedding, unpadded audio, per-layer inputs of the wrong rows) moves them by 1e-1.
TOL = 1e-4
CLIP_SECONDS = (0.6, 1.0)            # 4 and 7 audio soft tokens: both padded to 8
SAMPLE_RATE = 16_000


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    hf = make_hf_model(seed=0)
    directory = tmp_path_factory.mktemp('released')
    save_checkpoint(hf, directory)
    # HF's text config refuses None; the model reads the attribute at run time (hf_oracle).
    object.__setattr__(hf.config.get_text_config(), 'final_logit_softcapping', None)
    return hf, directory


@pytest.fixture(scope='module')
def ours(checkpoint):
    _, directory = checkpoint
    model = Gemma3nTransformer(config=model_config_from_hf(directory), dtype=jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', HFSoftcapWarning)     # we compare uncapped logits
        params = load_params(directory, model=model, dtype=np.float32, progress=False)
    return model, params


@pytest.fixture(scope='module')
def forward(ours):
    """The model's logits for every text token, compiled once for the tests' inputs."""
    model, _ = ours
    return jax.jit(lambda p, t, i, a: model.apply({'params': p}, t, images=i, audio=a).logits)


def inputs(seed: int = 0):
    """Two prompts, each with one image and one clip (of different lengths)."""
    rng = np.random.default_rng(seed)
    tokens = np.array([[2, 10, 11, BOI, 12, BOA, 13, 14],
                       [2, 20, BOA, 21, 22, BOI, 23, 24]], np.int32)
    images = rng.integers(0, 256, (2, 1, SMALL.image_size, SMALL.image_size, 3), np.uint8)
    clips = [tone_and_noise(seconds, SAMPLE_RATE, seed=i)
             for i, seconds in enumerate(CLIP_SECONDS)]
    mel, valid = log_mel_features(clips)
    return tokens, images, AudioInput(mel[:, None], valid[:, None])


def hf_input_ids(tokens: np.ndarray, towers) -> np.ndarray:
    """The processor's expansion of each marker into its block."""
    blocks = {towers.image_ids.marker: multimodal.block_tokens(towers.image_soft_tokens,
                                                               towers.image_ids),
              towers.audio_ids.marker: multimodal.block_tokens(towers.audio_soft_tokens,
                                                               towers.audio_ids)}
    return np.stack([np.concatenate([blocks.get(t, [t]) for t in row]) for row in tokens])


def test_config_and_towers_load(checkpoint, ours):
    hf, directory = checkpoint
    model, params = ours
    towers = model.config.towers
    assert towers.vision == SMALL and towers.audio.hidden_size == 32
    assert towers.audio_soft_tokens == AUDIO_SOFT_TOKENS
    assert (towers.image_ids.marker, towers.audio_ids.marker) == (BOI, BOA)
    assert model.config.num_embed == TEXT_VOCAB
    assert set(params['towers']) == {'vision_tower', 'embed_vision', 'audio_tower', 'embed_audio'}
    state = hf.state_dict()
    np.testing.assert_array_equal(params['towers']['embed_audio']['embedding'],
                                  state['model.embed_audio.embedding.weight'].numpy())
    # A text-only config.json has no towers.
    assert towers_config_from_hf({'text_config': {}}) is None


def test_logits_match_transformers(checkpoint, ours, forward):
    hf, _ = checkpoint
    model, params = ours
    tokens, images, audio = inputs()
    out = forward(params, tokens, images, audio)
    ids = hf_input_ids(tokens, model.config.towers)
    pixels = (images[:, 0].astype(np.float32) * np.float32(1 / 255)).transpose(0, 3, 1, 2)
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids).long(),
                    pixel_values=torch.from_numpy(np.ascontiguousarray(pixels)),
                    input_features=torch.from_numpy(audio.mel[:, 0]),
                    input_features_mask=torch.from_numpy(audio.valid[:, 0])).logits.numpy()
    assert theirs.shape[-1] == HF_VOCAB
    # Our rows are per text token: the row of its expanded position (a marker's: its block's
    # leading "\n\n"); the last rows see both the image and the clip.
    _, text_index, _ = jax.jit(lambda t: _text_index(model, t))(tokens)
    expected = np.take_along_axis(theirs[..., :TEXT_VOCAB], np.asarray(text_index)[..., None], 1)
    assert np.asarray(out).shape == expected.shape
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=TOL)


def _text_index(model, tokens):
    """Where each text token lands after both expansions (images first, then audio)."""
    towers = model.config.towers
    return multimodal.expand_blocks(tokens, [(1, towers.image_soft_tokens, towers.image_ids),
                                             (1, towers.audio_soft_tokens, towers.audio_ids)])


def test_sampler_prefill_in_chunks_matches_one_forward(ours, forward):
    """The sampler's chunked prefill (blocks cut across chunks; images and audio encoded once
    and merged chunk by chunk) gives the logits of one full forward. Same float32 weights and
    code on both sides, other shapes: measured ~2e-6 apart."""
    model, params = ours
    tokens, images, audio = inputs(seed=1)
    whole = forward(params, tokens, images, audio)[:, -1]     # the last text token's
    sampler = Sampler(model=model, params=params, cache_length=64, prefill_chunk=16)
    run = sampler.generation(list(tokens), 2, images=images, audio=audio, keep_logits=True)
    for _ in run:
        pass
    np.testing.assert_allclose(run.output().logits[:, 0], np.asarray(whole), rtol=0, atol=TOL)


def test_load_gives_the_released_model_with_its_towers(checkpoint, ours, tmp_path):
    """`gemma3n.load` builds the model config.json describes, towers included, with the weights
    loaded by hand (the per-layer table read row by row instead), and its sampler takes image
    and audio files. The loaded weights are compared here; the lazily read table's logits are
    test_load's, the towers' are test_logits_match_transformers'."""
    _, directory = checkpoint
    model, params = ours
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', HFSoftcapWarning)
        loaded = gemma3n.load(directory, dtype='float32', tokenizer=default_tokenizer_path(),
                              progress=False)
        text_only = gemma3n.load(directory, dtype='float32', tokenizer=False, towers=False,
                                 progress=False)
    assert loaded.model.has_vision and loaded.model.has_audio
    assert loaded.model.config == model.config
    assert not (text_only.model.has_vision or text_only.model.has_audio)
    # The weights in the serving layout, the table left in the file.
    flat = flatten_params(params)
    table = flat.pop(PER_LAYER_TABLE_PATH)
    _, expected = to_serving(model, unflatten_params(flat))
    assert jax.tree.structure(loaded.params) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, expected)
    ids = np.array([[0, BOI, TEXT_VOCAB - 1]])
    np.testing.assert_array_equal(loaded.per_layer_table[ids], table[ids])

    image = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), np.uint8)).save(image)
    clip = tmp_path / 'tone.wav'
    soundfile.write(clip, tone_and_noise(0.7, 44_100, channels=2), 44_100)
    sampler = loaded.sampler(cache_length=128)
    answer = sampler.sample('Describe both.', images=[image], audio=[clip], max_new_tokens=2)
    assert isinstance(answer, str)
    ids = sampler.encode('<start_of_image><start_of_audio>Describe both.', add_bos=True)
    assert ids[:3] == [BOS, BOI, BOA]
    with pytest.raises(AudioInputError, match='not an audio file'):
        sampler.sample('Hi', audio=[image], max_new_tokens=1)


def test_released_config_from_hf_defaults():
    """transformers' default Gemma3nConfig is the released E4B: our released TowersConfig."""
    assert towers_config_from_hf(transformers.Gemma3nConfig().to_dict()) == TowersConfig()
    audio_only = {k: v for k, v in transformers.Gemma3nConfig().to_dict().items()
                  if k != 'vision_config'}
    assert towers_config_from_hf(audio_only).vision is None


def test_bad_configs_and_inputs_are_refused(ours):
    with pytest.raises(ValueError, match='needs a vision or an audio tower'):
        TowersConfig(vision=None, audio=None)
    with pytest.raises(ValueError, match="placeholder id\\(s\\) must be hard tokens"):
        TowersConfig(image_ids=BlockIds(marker=255_999, placeholder=7, end=262_144))
    with pytest.raises(ValueError, match='one vision tower'):
        dataclasses.replace(e4b_config(), towers=TowersConfig())
    model, params = ours
    tokens, images, audio = inputs()
    audio_only = model.clone(config=dataclasses.replace(
        model.config, towers=dataclasses.replace(model.config.towers, vision=None)))
    with pytest.raises(ValueError, match='does not have vision encoder'):
        audio_only.apply({'params': params}, tokens, images=images, audio=audio)
    with pytest.raises(ValueError, match='has no audio tower'):
        model.clone(text_only=True).apply({'params': params}, tokens, audio=audio)
    with pytest.raises(ValueError, match=r'marker counts \[1, 1\]'):
        model.apply({'params': params}, tokens, images=images,
                    audio=AudioInput(np.concatenate([audio.mel] * 2, 1),
                                     np.concatenate([audio.valid] * 2, 1)))
