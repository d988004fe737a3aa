"""The audio tower of the released Gemma 3n checkpoints: file reading, features, encoder.

    file -> load_audio (16 kHz mono, <= 30 s) -> log_mel_features [B, T, 128]
         -> AudioEncoder (sub-sample convolutions, conformer blocks) -> soft tokens [B, S, 1536]
         -> MultimodalEmbedder.embed_soft (`gemma3n.multimodal_embedder`) -> [B, S, text width]

Example:
    >>> from gemma3n.audio import AudioConfig, AudioEncoder, load_audio, log_mel_features
    >>> mel, valid = log_mel_features([load_audio('speech.wav')])
    >>> encoder = AudioEncoder(AudioConfig())
    >>> tokens, token_valid = encoder.apply({'params': params}, mel, valid)   # [1, <=188, 1536]
"""

from gemma3n.audio.audio_file import (AudioInputError, AudioTruncatedWarning, load_audio,
                                      prepare_audio)
from gemma3n.audio.config import AudioConfig
from gemma3n.audio.encoder import AudioEncoder
from gemma3n.audio.features import SAMPLE_RATE, log_mel_features

__all__ = [
    'AudioConfig',
    'AudioEncoder',
    'AudioInputError',
    'AudioTruncatedWarning',
    'SAMPLE_RATE',
    'load_audio',
    'log_mel_features',
    'prepare_audio',
]
