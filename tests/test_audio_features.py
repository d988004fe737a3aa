"""Tests of audio input (issue 16): file reading, resampling, log-mel features against
`transformers`' `Gemma3nAudioFeatureExtractor`, and bad input.

The oracle pipeline for files is transformers' own `load_audio(..., backend='soundfile')`
(soundfile decoding, soxr resampling, librosa's length rule) followed by the extractor.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import soundfile
import transformers
from transformers.audio_utils import load_audio as hf_load_audio

from gemma3n.audio import (SAMPLE_RATE, AudioInputError, AudioTruncatedWarning, load_audio,
                           log_mel_features, prepare_audio)
from gemma3n.audio.features import FRAME_LENGTH, MAX_SAMPLES, MEL_BINS, num_frames

CD_RATE = 44_100
# Features agree to float32 rounding: both sides run the same precisions (float32 frames and
# FFT, float64 filter bank), measured max difference 0.0 on these inputs; 1e-5 (the issue's
# bound) on log-mel values of magnitude up to ~11.5 still catches any wrong window, filter edge,
# pre-emphasis or padding rule (those move values by 1e-2 or more).
FEATURE_TOL = 1e-5


def tone_and_noise(seconds: float, rate: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A 440 Hz + 1250 Hz tone with white noise, float32 [N] or [N, channels] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t + 0.3)
    clip = tone[:, None] * np.linspace(1.0, 0.5, channels) + 0.05 * rng.standard_normal(
        (t.shape[0], channels))
    return (clip[:, 0] if channels == 1 else clip).astype(np.float32)


@pytest.fixture(scope='module')
def extractor() -> transformers.Gemma3nAudioFeatureExtractor:
    return transformers.Gemma3nAudioFeatureExtractor()


def hf_features(extractor, clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    out = extractor(clips, return_tensors='np')
    return out['input_features'], out['input_features_mask']


@pytest.mark.parametrize('rate, subtype, channels', [
    (CD_RATE, 'PCM_16', 2),        # must be resampled and mixed down
    (SAMPLE_RATE, 'FLOAT', 1),
    (22_050, 'PCM_24', 1),
])
def test_file_features_equal_transformers(tmp_path, extractor, rate, subtype, channels):
    path = tmp_path / f'clip_{rate}.wav'
    soundfile.write(path, tone_and_noise(3.3, rate, channels=channels), rate, subtype=subtype)
    samples = load_audio(path)
    reference = hf_load_audio(str(path), sampling_rate=SAMPLE_RATE, backend='soundfile')
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, reference)
    ours, valid = log_mel_features([samples])
    theirs, their_valid = hf_features(extractor, [reference])
    assert ours.shape == theirs.shape == (1, num_frames(samples.shape[0]), MEL_BINS)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=FEATURE_TOL)
    np.testing.assert_array_equal(valid, their_valid)


def test_batch_of_lengths_pads_like_transformers(extractor):
    clips = [tone_and_noise(s, SAMPLE_RATE, seed=i) for i, s in enumerate((2.0, 0.7, 1.234))]
    clips.append(clips[0][:FRAME_LENGTH + 1])          # the shortest clip with one frame
    ours, valid = log_mel_features(clips)
    theirs, their_valid = hf_features(extractor, clips)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=FEATURE_TOL)
    np.testing.assert_array_equal(valid, their_valid)
    # A frame is valid when it starts on a real sample (so a clip's last frames reach past it).
    starts = np.arange(ours.shape[1]) * 160
    assert valid.sum(axis=1).tolist() == [int(np.sum(starts < c.shape[0])) for c in clips]


def test_thirty_seconds_and_more(extractor):
    clip = tone_and_noise(31.0, SAMPLE_RATE)
    ours, valid = log_mel_features([clip])
    theirs, _ = hf_features(extractor, [clip])          # it cuts to 30 s silently
    assert ours.shape == (1, 2997, MEL_BINS) and valid.all()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=FEATURE_TOL)


def test_long_file_keeps_first_thirty_seconds(tmp_path):
    path = tmp_path / 'long.wav'
    clip = tone_and_noise(31.5, CD_RATE)
    soundfile.write(path, clip, CD_RATE, subtype='FLOAT')
    with pytest.warns(AudioTruncatedWarning, match=r'long\.wav: 31\.5 s long.*keeping the first '
                                                   r'30 s'):
        samples = load_audio(path)
    assert samples.shape == (MAX_SAMPLES,)
    full = hf_load_audio(str(path), sampling_rate=SAMPLE_RATE, backend='soundfile')
    # Reading only the first 30 s changes the resampler's input near the cut alone.
    np.testing.assert_allclose(samples[:-SAMPLE_RATE // 100], full[:MAX_SAMPLES - SAMPLE_RATE // 100],
                               rtol=0, atol=1e-6)


def test_short_file_no_warning(tmp_path):
    path = tmp_path / 'short.wav'
    soundfile.write(path, tone_and_noise(1.0, SAMPLE_RATE), SAMPLE_RATE)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert load_audio(path).shape == (SAMPLE_RATE,)


@pytest.mark.parametrize('dtype, full_scale, offset', [
    (np.int16, 2 ** 15, 0), (np.int32, 2 ** 31, 0), (np.uint8, 2 ** 7, 2 ** 7)])
def test_pcm_arrays_are_scaled(dtype, full_scale, offset):
    pcm = np.array([0, 1, -1, 100, -100] * 200) + offset
    samples = prepare_audio(pcm.astype(dtype), SAMPLE_RATE)
    np.testing.assert_array_equal(samples, ((pcm - offset) / full_scale).astype(np.float32))


def test_stereo_array_is_averaged_and_resampled():
    stereo = tone_and_noise(1.0, CD_RATE, channels=2)
    samples = prepare_audio(stereo, CD_RATE)
    assert samples.shape == (math.ceil(stereo.shape[0] * SAMPLE_RATE / CD_RATE),)
    np.testing.assert_allclose(samples, prepare_audio(stereo.mean(axis=1), CD_RATE), atol=1e-7)


def _write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def test_bad_files_name_the_file(tmp_path):
    cases = {
        tmp_path / 'missing.wav': 'no such audio file',
        _write_bytes(tmp_path / 'text.wav', b'this is not audio at all\n' * 10):
            'not an audio file soundfile can decode',
        _write_bytes(tmp_path / 'zero.wav', b''): r'empty file \(0 bytes\)',
    }
    empty = tmp_path / 'empty.wav'
    soundfile.write(empty, np.zeros(0, np.float32), SAMPLE_RATE)
    cases[empty] = 'no audio samples'
    tiny = tmp_path / 'tiny.wav'
    soundfile.write(tiny, tone_and_noise(0.02, SAMPLE_RATE), SAMPLE_RATE)
    cases[tiny] = r'20\.0 ms of audio; the model needs more than 32 ms'
    for path, message in cases.items():
        with pytest.raises(AudioInputError, match=message) as err:
            load_audio(path)
        text = str(err.value)
        assert text.startswith(str(path) + ':') and '\n' not in text


def test_unsupported_wav_encoding(tmp_path):
    # A WAV header announcing format tag 0x7777 for 16-bit mono at 16 kHz: no codec has that
    # tag, and libsndfile rejects the 'fmt ' chunk.
    fmt = (b'fmt ' + (16).to_bytes(4, 'little') + (0x7777).to_bytes(2, 'little')
           + (1).to_bytes(2, 'little') + SAMPLE_RATE.to_bytes(4, 'little')
           + (2 * SAMPLE_RATE).to_bytes(4, 'little') + (2).to_bytes(2, 'little')
           + (16).to_bytes(2, 'little'))
    data = b'data' + (2000).to_bytes(4, 'little') + bytes(2000)
    body = b'WAVE' + fmt + data
    path = _write_bytes(tmp_path / 'odd.wav', b'RIFF' + len(body).to_bytes(4, 'little') + body)
    with pytest.raises(AudioInputError, match=r"odd\.wav: not an audio file soundfile can decode "
                                              r"\(.*'fmt '.*\)\.$") as err:
        load_audio(path)
    assert 'Error opening' not in str(err.value)        # libsndfile's reason, without preamble


@pytest.mark.parametrize('samples, rate, message', [
    (np.zeros(1000, np.int64), SAMPLE_RATE, 'unsupported sample format int64'),
    (np.zeros(1000, np.complex64), SAMPLE_RATE, 'unsupported sample format complex64'),
    (np.full(1000, np.nan, np.float32), SAMPLE_RATE, 'NaN or infinity'),
    (np.zeros((2, 1000, 2), np.float32), SAMPLE_RATE, r'must be \[N\] or \[N, channels\]'),
    (np.zeros(1000, np.float32), 0, 'sample rate must be a positive integer'),
    (np.zeros(1000, np.float32), 16000.5, 'sample rate must be a positive integer'),
    (np.zeros((0, 2), np.float32), SAMPLE_RATE, 'no audio samples'),
])
def test_bad_arrays(samples, rate, message):
    with pytest.raises(AudioInputError, match=f'audio array: .*{message}'):
        prepare_audio(samples, rate)


def test_feature_input_checks():
    with pytest.raises(ValueError, match='no audio clips'):
        log_mel_features([])
    with pytest.raises(ValueError, match='clip 1 has 512 samples; the model needs more than 512'):
        log_mel_features([np.zeros(1000, np.float32), np.zeros(FRAME_LENGTH, np.float32)])
    with pytest.raises(ValueError, match='clip 0 must be one-dimensional float samples'):
        log_mel_features([np.zeros(1000, np.int16)])
