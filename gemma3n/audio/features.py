"""Log-mel features of 16 kHz audio, as the Gemma 3n audio tower was trained on them (numpy).

For a batch of clips (float samples in [-1, 1] at 16 kHz):
1. each clip is cut to `MAX_SAMPLES` (30 s) and the batch right-padded with zeros to its longest
   clip rounded up to a multiple of `PAD_MULTIPLE` samples;
2. frames of `FRAME_LENGTH + 1` samples every `HOP_LENGTH` (32 ms every 10 ms); HTK-style
   pre-emphasis turns each into FRAME_LENGTH samples (the first scaled by 1 - 0.97, the rest
   x[i] - 0.97 x[i - 1]), which a periodic Hann window weighs;
3. magnitude of the FFT_LENGTH-point real FFT (twice the frame, zero-padded), a bank of
   `MEL_BINS` triangular HTK-mel filters from 125 Hz to 7600 Hz (no area normalisation), and the
   log of the result floored at 1e-5.

A frame is valid when its first sample is a real (not padding) sample. The arithmetic runs in the
same precisions as Hugging Face's `Gemma3nAudioFeatureExtractor` (float32 frames and FFT, float64
filter bank), so the two agree to float32 rounding.

Example:
    >>> mel, valid = log_mel_features([clip_a, clip_b])   # float32 [2, T, 128], bool [2, T]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 16_000
MAX_SECONDS = 30
MAX_SAMPLES = MAX_SECONDS * SAMPLE_RATE
PAD_MULTIPLE = 128
FRAME_LENGTH = 512                  # 32 ms
HOP_LENGTH = 160                    # 10 ms
FFT_LENGTH = 1024                   # next power of two of the frame, doubled ("FFT overdrive")
MEL_BINS = 128
MIN_FREQUENCY = 125.0
MAX_FREQUENCY = 7600.0
PREEMPHASIS = 0.97
MEL_FLOOR = 1e-5
# HTK mel scale: mel(f) = MEL_SCALE * log10(1 + f / MEL_BREAK).
MEL_SCALE = 2595.0
MEL_BREAK = 700.0


def _hz_to_mel(hz):
    return MEL_SCALE * np.log10(1.0 + hz / MEL_BREAK)


def _mel_to_hz(mel):
    return MEL_BREAK * (10.0 ** (mel / MEL_SCALE) - 1.0)


def mel_filter_bank() -> np.ndarray:
    """[FFT_LENGTH // 2 + 1, MEL_BINS] float64 triangular filters, equally spaced in HTK mel."""
    bin_hz = np.arange(FFT_LENGTH // 2 + 1, dtype=np.float32) * np.float32(SAMPLE_RATE / FFT_LENGTH)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(MIN_FREQUENCY), _hz_to_mel(MAX_FREQUENCY),
                                   MEL_BINS + 2))
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_hz[:, None] - lower) / (center - lower)
    falling = (upper - bin_hz[:, None]) / (upper - center)
    return np.maximum(0.0, np.minimum(rising, falling))


def _hann_window() -> np.ndarray:
    n = np.arange(FRAME_LENGTH, dtype=np.float32)
    return (0.5 * (1 - np.cos(2 * np.pi * n / FRAME_LENGTH))).astype(np.float32)


def num_frames(num_samples: int) -> int:
    """Feature frames of a batch whose longest clip has `num_samples` samples."""
    padded = math.ceil(min(num_samples, MAX_SAMPLES) / PAD_MULTIPLE) * PAD_MULTIPLE
    return max(0, (padded - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1)


def log_mel_features(clips: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features of a batch of clips.

    Args:
        clips: B one-dimensional float arrays, samples in [-1, 1] at 16 kHz, each long enough
            for one frame (more than FRAME_LENGTH samples); longer than 30 s is cut to 30 s.
    Returns:
        features float32 [B, T, MEL_BINS] and valid bool [B, T], T = num_frames(longest clip).
    """
    if not len(clips):
        raise ValueError('no audio clips given.')
    clips = [np.asarray(clip)[:MAX_SAMPLES] for clip in clips]
    for i, clip in enumerate(clips):
        if clip.ndim != 1 or not np.issubdtype(clip.dtype, np.floating):
            raise ValueError(f'audio clip {i} must be one-dimensional float samples, got '
                             f'{clip.dtype} of shape {clip.shape}.')
        if clip.shape[0] <= FRAME_LENGTH:
            raise ValueError(
                f'audio clip {i} has {clip.shape[0]} samples; the model needs more than '
                f'{FRAME_LENGTH} ({1000 * FRAME_LENGTH / SAMPLE_RATE:.0f} ms at {SAMPLE_RATE} Hz).')
    longest = max(clip.shape[0] for clip in clips)
    frames_count = num_frames(longest)
    padded_length = math.ceil(longest / PAD_MULTIPLE) * PAD_MULTIPLE
    samples = np.zeros((len(clips), padded_length), np.float32)
    for i, clip in enumerate(clips):
        samples[i, :clip.shape[0]] = clip
    starts = np.arange(frames_count) * HOP_LENGTH
    frames = np.lib.stride_tricks.sliding_window_view(
        samples, FRAME_LENGTH + 1, axis=-1)[:, ::HOP_LENGTH][:, :frames_count]   # [B, T, 513]
    emphasized = np.concatenate(
        [frames[..., :1] * (1.0 - PREEMPHASIS),
         frames[..., 1:-1] - PREEMPHASIS * frames[..., :-2]], axis=-1)      # [B, T, 512]
    spectrum = np.abs(np.fft.rfft(emphasized * _hann_window(), n=FFT_LENGTH, axis=-1))
    mel = np.log(np.maximum(spectrum @ mel_filter_bank(), MEL_FLOOR)).astype(np.float32)
    lengths = np.array([clip.shape[0] for clip in clips])
    return mel, starts[None, :] < lengths[:, None]
