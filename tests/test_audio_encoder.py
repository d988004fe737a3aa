"""Tests of the audio tower (issue 16): encoder and embedder against `transformers`
(`Gemma3nAudioEncoder`, `Gemma3nMultimodalEmbedder`) with the same random weights, the
checkpoint names at the released size, and the mapping's checks.

Numerics run on two small configs that together cover every mechanism: local attention with and
without a future horizon, chunks that do not divide the length, logit capping that bites
(cap 5), other sub-sample kernels and strides, a reduction factor of 2 and 4, and batches of clips
of different lengths (padding masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
import torch
import transformers
from transformers.audio_utils import load_audio as hf_load_audio
from transformers.models.gemma3n import modeling_gemma3n

from gemma3n.audio import SAMPLE_RATE, AudioConfig, AudioEncoder, load_audio, log_mel_features
from gemma3n.audio.features import MEL_BINS
from gemma3n.checkpoints.hf_audio import (AUDIO_TOWER_PREFIX, audio_config_from_hf,
                                          audio_embedder, hf_name, params_from_hf)
from gemma3n.layers.weights import init_params, weight_schema
from gemma3n.multimodal_embedder import MultimodalEmbedder
from hf_random_weights import randomize
from test_audio_features import CD_RATE, tone_and_noise

SMALL_HF_CONFIGS = {
    'causal': dict(hidden_size=32, conf_num_attention_heads=4, conf_num_hidden_layers=2,
                   input_feat_size=16, sscp_conv_channel_size=(8, 4), conf_attention_chunk_size=4,
                   conf_attention_context_left=5, conf_attention_context_right=0),
    'lookahead': dict(hidden_size=24, conf_num_attention_heads=2, conf_num_hidden_layers=2,
                      input_feat_size=20, sscp_conv_channel_size=(6, 5),
                      sscp_conv_kernel_size=((3, 3), (5, 3)), sscp_conv_stride_size=((2, 2), (1, 2)),
                      conf_attention_chunk_size=3, conf_attention_context_left=4,
                      conf_attention_context_right=2, conf_conv_kernel_size=3,
                      conf_reduction_factor=2, conf_residual_weight=0.7, conf_attention_logit_cap=5.0,
                      rms_norm_eps=1e-5, sscp_conv_group_norm_eps=1e-2),
}
# Mel frames of each clip of the test batch: the longest, one ending mid-chunk, a short one.
CLIP_FRAMES = (61, 44, 21)
# float32 agreement bound. Both sides compute the same function in float32 and differ in
# summation order only (einsum vs bmm, direct conv vs torch's, gathered vs shifted relative
# logits); soft tokens are RMS-normalised (values up to ~3.1) and the measured max difference
# is 2.3e-6. 1e-4 leaves room for BLAS differences while any modelling error (a mask off by one
# frame, eps, the cumulative variance's definition, the cap) moves values by 1e-2 or more.
TOL = 1e-4
# The embedder ends in an RMS norm (values up to ~3.4) after two float32 ops: measured 9.5e-7.
EMBED_TOL = 1e-5
TEXT_HIDDEN = 48


def state_of(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in module.state_dict().items()}


def mel_batch(config: AudioConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random mel [B, T, F] (padding frames random too) and valid [B, T]."""
    mel = np.random.default_rng(seed).standard_normal(
        (len(CLIP_FRAMES), CLIP_FRAMES[0], config.input_feat_size)).astype(np.float32)
    valid = np.arange(CLIP_FRAMES[0])[None, :] < np.array(CLIP_FRAMES)[:, None]
    return mel, valid


@pytest.fixture(scope='module', params=sorted(SMALL_HF_CONFIGS))
def encoder_pair(request):
    """(our config, our params, jitted apply, HF encoder) with the same random weights."""
    hf_config = transformers.Gemma3nAudioConfig(**SMALL_HF_CONFIGS[request.param])
    hf = transformers.Gemma3nAudioEncoder(hf_config).to(torch.float32).eval()
    randomize(hf, seed=len(request.param))
    config = audio_config_from_hf(hf_config.to_dict())
    encoder = AudioEncoder(config)
    mel, valid = mel_batch(config, 0)
    params = params_from_hf(state_of(hf), weight_schema(encoder, mel, valid))
    apply = jax.jit(lambda p, m, v: encoder.apply({'params': p}, m, v))
    return config, params, apply, hf


def hf_encode(hf, mel: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = hf(torch.from_numpy(mel), torch.from_numpy(~valid))
    return out.last_hidden_state.numpy(), ~out.audio_mel_mask.numpy()


@pytest.mark.parametrize('seed', [0, 1])
def test_encoder_matches_transformers(encoder_pair, seed):
    config, params, apply, hf = encoder_pair
    mel, valid = mel_batch(config, seed)
    tokens, token_valid = apply(params, mel, valid)
    expected, expected_valid = hf_encode(hf, mel, valid)
    assert tokens.shape == expected.shape == (len(CLIP_FRAMES), config.soft_tokens(CLIP_FRAMES[0]),
                                              config.hidden_size)
    np.testing.assert_array_equal(token_valid, expected_valid)
    assert not expected_valid.all() and expected_valid.any(axis=1).all()   # masks matter here
    np.testing.assert_allclose(np.asarray(tokens), expected, rtol=0, atol=TOL)
    assert (np.asarray(tokens)[~expected_valid] == 0).all()


def test_encoder_batch_without_padding(encoder_pair):
    config, params, apply, hf = encoder_pair
    mel, valid = mel_batch(config, 2)
    valid = np.ones_like(valid)                    # same shapes: the compiled program is reused
    tokens, token_valid = apply(params, mel, valid)
    expected, _ = hf_encode(hf, mel, valid)
    assert np.asarray(token_valid).all()
    np.testing.assert_allclose(np.asarray(tokens), expected, rtol=0, atol=TOL)


def test_wav_files_to_soft_tokens_match_transformers(tmp_path):
    """Two WAV files (44.1 kHz stereo, 16 kHz mono; 1.3 s and 0.8 s) through reading, features and
    a small encoder over the real 128 mel bins, against transformers' load_audio, extractor and
    encoder: real log-mel magnitudes (down to log 1e-5) and a padded batch. Measured max
    difference 1.3e-6 on values up to 3.3."""
    hf_config = transformers.Gemma3nAudioConfig(**{**SMALL_HF_CONFIGS['causal'],
                                                   'input_feat_size': MEL_BINS})
    hf = transformers.Gemma3nAudioEncoder(hf_config).to(torch.float32).eval()
    randomize(hf, seed=11)
    clips = {tmp_path / 'cd.wav': (tone_and_noise(1.3, CD_RATE, channels=2), CD_RATE),
             tmp_path / 'speech.wav': (tone_and_noise(0.8, SAMPLE_RATE, seed=1), SAMPLE_RATE)}
    for path, (clip, rate) in clips.items():
        soundfile.write(path, clip, rate, subtype='PCM_16')
    mel, valid = log_mel_features([load_audio(path) for path in clips])
    extracted = transformers.Gemma3nAudioFeatureExtractor()(
        [hf_load_audio(str(path), sampling_rate=SAMPLE_RATE, backend='soundfile') for path in clips],
        return_tensors='np')
    expected, expected_valid = hf_encode(hf, extracted['input_features'],
                                         extracted['input_features_mask'])
    encoder = AudioEncoder(audio_config_from_hf(hf_config.to_dict()))
    params = params_from_hf(state_of(hf), weight_schema(encoder, mel, valid))
    tokens, token_valid = jax.jit(lambda p: encoder.apply({'params': p}, mel, valid))(params)
    np.testing.assert_array_equal(token_valid, expected_valid)
    assert expected_valid.sum(axis=1).tolist() == [8, 5]          # 128 and 80 valid mel frames
    np.testing.assert_allclose(np.asarray(tokens), expected, rtol=0, atol=TOL)


def test_encoder_in_bfloat16(encoder_pair):
    """The released weights are bfloat16: the same encoder with bfloat16 weights and matmuls
    (norm statistics, logits and softmax stay float32) stays near the float32 result."""
    config, params, apply, _ = encoder_pair
    mel, valid = mel_batch(config, 0)
    encoder = AudioEncoder(config, dtype=jnp.bfloat16)
    params16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    tokens16, valid16 = jax.jit(lambda p: encoder.apply({'params': p}, mel, valid))(params16)
    tokens, _ = apply(params, mel, valid)
    assert tokens16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(valid16, np.asarray(apply(params, mel, valid)[1]))
    error = np.abs(np.asarray(tokens16, np.float32) - np.asarray(tokens))
    # bfloat16 keeps 8 mantissa bits (~4e-3 relative per rounding); through two blocks the
    # soft tokens (values up to ~3) move by 6.3e-2 at most, 8.7e-3 on average (measured); the
    # bounds leave ~1.6x and ~2.3x of margin (bfloat16 rounding on CPU is deterministic).
    assert error.max() < 0.1 and error.mean() < 0.02


def test_encoder_input_checks():
    encoder = AudioEncoder(AudioConfig(hidden_size=16, num_heads=2, num_layers=1, input_feat_size=8))
    with pytest.raises(ValueError, match=r'mel must be \[B, T, 8\]'):
        encoder.init(jax.random.key(0), jnp.zeros((1, 20, 9)), jnp.ones((1, 20), bool))
    with pytest.raises(ValueError, match=r'valid must be \[B, T\] = \(1, 20\)'):
        encoder.init(jax.random.key(0), jnp.zeros((1, 20, 8)), jnp.ones((1, 19), bool))


def test_released_size_names_and_shapes():
    """Every weight of the released audio tower, by HF name and shape (no memory allocated)."""
    with torch.device('meta'):
        hf = transformers.Gemma3nAudioEncoder(transformers.Gemma3nAudioConfig())
    config = AudioConfig()
    assert audio_config_from_hf(transformers.Gemma3nAudioConfig().to_dict()) == config
    mel = jax.ShapeDtypeStruct((1, 2997, config.input_feat_size), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, 2997), jnp.bool_)
    schema = weight_schema(AudioEncoder(config), mel, valid)
    ours = {hf_name(path): info.shape for path, info in schema.items()}
    theirs = {key: tuple(value.shape) for key, value in hf.state_dict().items()}
    assert ours == theirs
    assert all(len(info.axes) == len(info.shape) for info in schema.values())
    assert schema['conformer_11/attention/attn/q_proj/w'].axes == ('audio_qkv', 'audio_embed')
    tokens, token_valid = jax.eval_shape(
        lambda m, v: AudioEncoder(config).init_with_output(jax.random.key(0), m, v)[0], mel, valid)
    assert tokens.shape == (1, 188, 1536) and token_valid.shape == (1, 188)   # 30 s -> 188


def test_mapping_reports_missing_unexpected_and_misshapen():
    config = AudioConfig(hidden_size=16, num_heads=2, num_layers=1, input_feat_size=8,
                         sscp_channels=(4, 4))
    encoder = AudioEncoder(config)
    mel, valid = jnp.zeros((1, 20, 8)), jnp.ones((1, 20), bool)
    schema = weight_schema(encoder, mel, valid)
    state = {AUDIO_TOWER_PREFIX + hf_name(path): np.zeros(info.shape, np.float32)
             for path, info in schema.items()}
    state['model.language_model.embed_tokens.weight'] = np.zeros(3)   # outside the prefix
    params = params_from_hf(state, schema, prefix=AUDIO_TOWER_PREFIX)
    fresh = jax.eval_shape(lambda: init_params(encoder, jax.random.key(0), mel, valid))
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, fresh)
    del state[AUDIO_TOWER_PREFIX + 'conformer.0.norm.weight']
    state[AUDIO_TOWER_PREFIX + 'conformer.1.norm.weight'] = np.zeros(16)
    state[AUDIO_TOWER_PREFIX + 'conformer.0.lconv1d.linear_end.weight'] = np.zeros((16, 8))
    with pytest.raises(ValueError) as err:
        params_from_hf(state, schema, prefix=AUDIO_TOWER_PREFIX)
    message = str(err.value)
    assert 'missing 1: model.audio_tower.conformer.0.norm.weight' in message
    assert 'unexpected 1: model.audio_tower.conformer.1.norm.weight' in message
    assert 'conformer.0.lconv1d.linear_end.weight (16, 8) (expected (16, 16))' in message


@pytest.fixture(scope='module')
def embedder_pair():
    audio = transformers.Gemma3nAudioConfig(**SMALL_HF_CONFIGS['causal'])
    text = transformers.Gemma3nTextConfig(hidden_size=TEXT_HIDDEN)
    hf = modeling_gemma3n.Gemma3nMultimodalEmbedder(audio, text).to(torch.float32).eval()
    randomize(hf, seed=7)
    ours = audio_embedder(audio_config_from_hf(audio.to_dict()), TEXT_HIDDEN)
    ids = np.array([[audio.vocab_offset, audio.vocab_offset + 5, audio.vocab_offset + 127]])
    soft = np.random.default_rng(3).standard_normal((2, 5, audio.hidden_size)).astype(np.float32)
    params = params_from_hf(state_of(hf), weight_schema(ours, ids, soft))
    return ours, params, hf, ids, soft


def test_embedder_matches_transformers(embedder_pair):
    ours, params, hf, ids, soft = embedder_pair
    hard, projected = ours.apply({'params': params}, ids, soft)
    with torch.no_grad():
        expected_hard = hf(input_ids=torch.from_numpy(ids)).numpy()
        expected_soft = hf(inputs_embeds=torch.from_numpy(soft)).numpy()
    assert projected.shape == (2, 5, TEXT_HIDDEN) and hard.shape == (1, 3, TEXT_HIDDEN)
    np.testing.assert_allclose(np.asarray(projected), expected_soft, rtol=0, atol=EMBED_TOL)
    np.testing.assert_allclose(np.asarray(hard), expected_hard, rtol=0, atol=EMBED_TOL)
    alone = ours.apply({'params': params}, soft, method=MultimodalEmbedder.embed_soft)
    np.testing.assert_array_equal(alone, projected)


def test_embedder_rejects_ids_outside_its_vocabulary(embedder_pair):
    ours, params, _, ids, _ = embedder_pair
    below = np.array([[ids[0, 0] - 1, ids[0, 0]]])             # a vision id, then an audio one
    with pytest.raises(ValueError, match=r'ids must lie in \[262272, 262400\), got values from '
                                         r'262271 to 262272'):
        ours.apply({'params': params}, below, method=MultimodalEmbedder.embed_ids)
