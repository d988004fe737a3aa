"""Audio files and sample arrays -> mono float32 samples at 16 kHz, at most 30 s.

Files are read with `soundfile` (WAV, FLAC, OGG, MP3, ... whatever libsndfile decodes, any integer
or float sample format), channels averaged to mono, resampled with `soxr` at its high quality
setting (the resampler `transformers`' `load_audio` uses through librosa), and cut to the 30 s the
audio tower takes; a longer clip keeps its first 30 s and says so with an `AudioTruncatedWarning`.

Bad input raises `AudioInputError`, a one-line message naming the file (or "audio array"):
missing file, not audio, empty, too short for one feature frame, non-finite or unsupported
samples.

Example:
    >>> samples = load_audio('speech.wav')                  # float32 [N], N <= 480000
    >>> samples = prepare_audio(pcm16, sample_rate=44_100)  # int16 [N] or [N, channels]
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import soundfile
import soxr

from gemma3n.audio.features import FRAME_LENGTH, MAX_SAMPLES, MAX_SECONDS, SAMPLE_RATE

RESAMPLE_QUALITY = 'HQ'
ARRAY_SOURCE = 'audio array'
# Integer PCM formats: the value that maps to full scale 1.0, and the zero offset (unsigned).
PCM_FULL_SCALE = {np.dtype(np.int16): (2 ** 15, 0), np.dtype(np.int32): (2 ** 31, 0),
                  np.dtype(np.uint8): (2 ** 7, 2 ** 7)}
FLOAT_FORMATS = (np.dtype(np.float32), np.dtype(np.float64))
MIN_SAMPLES = FRAME_LENGTH + 1
SAMPLES_RANKS = (1, 2)       # [N] mono or [N, channels]


class AudioInputError(ValueError):
    """Audio that cannot be used, with a one-line message naming its source."""


class AudioTruncatedWarning(UserWarning):
    """A clip longer than the audio tower takes; its first MAX_SECONDS are kept."""


def _to_float(samples: np.ndarray, source: str) -> np.ndarray:
    """PCM or float samples (of a checked format) -> float32 in [-1, 1] (floats as given)."""
    if samples.dtype in PCM_FULL_SCALE:
        full_scale, offset = PCM_FULL_SCALE[samples.dtype]
        return ((samples.astype(np.float64) - offset) / full_scale).astype(np.float32)
    if not np.isfinite(samples).all():
        raise AudioInputError(f'{source}: samples contain NaN or infinity.')
    return samples.astype(np.float32)


def _check_format(samples: np.ndarray, sample_rate: int, source: str) -> None:
    if samples.ndim not in SAMPLES_RANKS:
        raise AudioInputError(f'{source}: samples must be [N] or [N, channels], got shape '
                              f'{samples.shape}.')
    if samples.dtype not in PCM_FULL_SCALE and samples.dtype not in FLOAT_FORMATS:
        supported = ', '.join(str(d) for d in (*PCM_FULL_SCALE, *FLOAT_FORMATS))
        raise AudioInputError(f'{source}: unsupported sample format {samples.dtype} (use one of '
                              f'{supported}).')
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioInputError(f'{source}: sample rate must be a positive integer, got '
                              f'{sample_rate!r}.')
    if samples.size == 0:
        raise AudioInputError(f'{source}: no audio samples (empty).')


def prepare_audio(samples, sample_rate: int, source: str = ARRAY_SOURCE) -> np.ndarray:
    """Samples [N] or [N, channels] at `sample_rate` -> mono float32 [<= MAX_SAMPLES] at 16 kHz.

    Warns (AudioTruncatedWarning) when the clip is longer than MAX_SECONDS and keeps its start.
    """
    samples = np.asarray(samples)
    return _prepare(samples, sample_rate, source, samples.shape[0] if samples.ndim else 0)


def _prepare(samples: np.ndarray, sample_rate: int, source: str, total_frames: int) -> np.ndarray:
    """prepare_audio of the first frames of a clip of `total_frames` frames."""
    _check_format(samples, sample_rate, source)
    seconds = total_frames / sample_rate
    if seconds > MAX_SECONDS:
        warnings.warn(AudioTruncatedWarning(
            f'{source}: {seconds:.1f} s long; the audio tower takes {MAX_SECONDS} s, keeping the '
            f'first {MAX_SECONDS} s.'), stacklevel=3)
    samples = samples[:_source_frames_kept(sample_rate)]
    mono = _to_float(samples, source)
    if mono.ndim == 2:
        mono = mono.mean(axis=1, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        # librosa's length convention (ceil), which transformers' `load_audio` keeps too.
        length = math.ceil(mono.shape[0] * SAMPLE_RATE / sample_rate)
        mono = soxr.resample(mono, sample_rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
        mono = np.pad(mono, (0, max(0, length - mono.shape[0])))[:length]
    mono = np.ascontiguousarray(mono[:MAX_SAMPLES], np.float32)
    if mono.shape[0] < MIN_SAMPLES:
        raise AudioInputError(
            f'{source}: {1000 * seconds:.1f} ms of audio; the model needs more than '
            f'{1000 * FRAME_LENGTH / SAMPLE_RATE:.0f} ms ({MIN_SAMPLES} samples at {SAMPLE_RATE} Hz).')
    return mono


def _source_frames_kept(sample_rate: int) -> int:
    # One source frame beyond 30 s so the resampled clip still fills its last output samples.
    return math.ceil(MAX_SECONDS * sample_rate) + 1


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """Reads an audio file -> mono float32 samples [<= MAX_SAMPLES] at 16 kHz."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise AudioInputError(f'{source}: no such audio file.')
    if os.path.getsize(source) == 0:
        raise AudioInputError(f'{source}: empty file (0 bytes).')
    try:
        with soundfile.SoundFile(source) as audio:
            # Only what the model takes is read; the length check sees the full frame count.
            samples = audio.read(min(audio.frames, _source_frames_kept(audio.samplerate)),
                                 dtype='float32', always_2d=True)
            sample_rate, total_frames = audio.samplerate, audio.frames
    except (soundfile.SoundFileError, RuntimeError) as err:
        # libsndfile's own words, without soundfile's "Error opening '<path>': " preamble.
        reason = getattr(err, 'error_string', '') or str(err).splitlines()[0] or type(err).__name__
        raise AudioInputError(f'{source}: not an audio file soundfile can decode ({reason}).'
                              ) from None
    return _prepare(samples, sample_rate, source, total_frames)
