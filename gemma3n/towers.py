"""The released checkpoints' towers inside the model: MobileNet-V5 and audio, with their embedders.

`ReleasedTowers` (the `towers` submodule of `Gemma3nTransformer` when its config has
`towers`) does what `transformers`' `Gemma3nModel.forward` does around the text decoder:

- hard tokens: ids in a tower's range (e.g. `<end_of_image>`, `<end_of_audio>`) take that
  tower's embedder row (`embed_ids`) instead of the text table's;
- images uint8 `[B, N, S, S, 3]` (already resized to the tower's S x S) are rescaled by 1/255,
  encoded to `[B, N, 256, 2048]` soft tokens and embedded into the text width (`encode_images`);
- audio log-mel frames `AudioInput` are encoded and embedded; soft tokens of padding frames,
  and the slots a short clip leaves empty, take the embedding of the audio pad token
  (`encode_audio`), so every clip fills `audio_soft_tokens` placeholders.

Parameters: `vision_tower/...` (`MobileNetV5`), `embed_vision/...`, `audio_tower/...`
(`AudioEncoder`), `embed_audio/...` (`MultimodalEmbedder`), each the checkpoint's tensors by
name (`gemma3n.checkpoints.hf_towers`).

Example:
    >>> towers = ReleasedTowers(TowersConfig(), text_width=2048)
    >>> soft = towers.apply({'params': p}, images, method=ReleasedTowers.encode_images)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.audio.config import AudioConfig
from gemma3n.audio.encoder import AudioEncoder
from gemma3n.multimodal import check_per_sequence
from gemma3n.multimodal_embedder import MultimodalEmbedder
from gemma3n.towers_config import TowersConfig
from gemma3n.vision.mobilenet.config import MobileNetConfig
from gemma3n.vision.mobilenet.encoder import MobileNetV5
from gemma3n.vision.mobilenet.preprocess import RESCALE_FACTOR

AUDIO_RANK = 4          # mel [B, M, T, F]: M clips per sequence


@flax.struct.dataclass
class AudioInput:
    """Audio for a batch of token sequences: M clips per sequence.

    mel: float32 [B, M, T, F] log-mel frames (`gemma3n.audio.features.log_mel_features`).
    valid: bool [B, M, T], False on frames that pad a clip to the batch's longest.
    """
    mel: jax.Array
    valid: jax.Array

    @property
    def num_clips(self) -> int:
        return self.mel.shape[1]


def vision_embedder(config: MobileNetConfig, text_width: int, *, vocab_size: int,
                    vocab_offset: int, eps: float) -> MultimodalEmbedder:
    """`embed_vision`: the tower's soft tokens are scaled by sqrt(width) before its norm."""
    return MultimodalEmbedder(vocab_size, vocab_offset, config.hidden_size, text_width, eps=eps,
                              scale_soft_tokens=True)


def audio_embedder(config: AudioConfig, text_width: int,
                   dtype: Any = jnp.float32) -> MultimodalEmbedder:
    """`embed_audio`: built from the audio config (its vocabulary, width and eps)."""
    return MultimodalEmbedder(config.vocab_size, config.vocab_offset, config.hidden_size,
                              text_width, eps=config.rms_norm_eps, dtype=dtype)


def check_audio(audio: Any, marker_counts: np.ndarray | None, num_sequences: int,
                towers: TowersConfig) -> AudioInput:
    """Validates audio for a batch of token sequences (one clip per marker of each)."""
    if not isinstance(audio, AudioInput):
        raise TypeError(f'audio must be an AudioInput(mel, valid), got {type(audio).__name__}.')
    mel, valid, config = audio.mel, audio.valid, towers.audio
    if mel.ndim != AUDIO_RANK or mel.shape[-1] != config.input_feat_size:
        raise ValueError(f'audio.mel must be [B, M, T, {config.input_feat_size}], got shape '
                         f'{tuple(mel.shape)}.')
    if tuple(valid.shape) != tuple(mel.shape[:3]):
        raise ValueError(f'audio.valid must be [B, M, T] = {tuple(mel.shape[:3])}, got shape '
                         f'{tuple(valid.shape)}.')
    check_per_sequence('audio is', mel.shape[:2], num_sequences, marker_counts,
                       '<start_of_audio>', 'clip')
    made = config.soft_tokens(mel.shape[2])
    if made > towers.audio_soft_tokens:
        raise ValueError(f'{mel.shape[2]} log-mel frames give {made} audio soft tokens; the model '
                         f'takes {towers.audio_soft_tokens} per clip: cut the clip.')
    return AudioInput(jnp.asarray(mel, jnp.float32), jnp.asarray(valid, bool))


class ReleasedTowers(nn.Module):
    """The vision and/or audio tower of `config` with their embedders into `text_width`."""
    config: TowersConfig
    text_width: int

    def setup(self):
        cfg = self.config
        if cfg.vision is not None:
            self.vision_tower = MobileNetV5(cfg.vision)
            self.embed_vision = vision_embedder(
                cfg.vision, self.text_width, vocab_size=cfg.vision_vocab_size,
                vocab_offset=cfg.vision_vocab_offset, eps=cfg.vision_embed_eps)
        if cfg.audio is not None:
            self.audio_tower = AudioEncoder(cfg.audio)
            self.embed_audio = audio_embedder(cfg.audio, self.text_width)

    def _embedders(self) -> list[tuple[MultimodalEmbedder, int, int]]:
        cfg, found = self.config, []
        if cfg.vision is not None:
            found.append((self.embed_vision, cfg.vision_vocab_offset, cfg.vision_vocab_size))
        if cfg.audio is not None:
            found.append((self.embed_audio, cfg.audio.vocab_offset, cfg.audio.vocab_size))
        return found

    def embed_ids(self, tokens: jax.Array, x: jax.Array) -> jax.Array:
        """x [B, L, D] with the rows of the towers' hard tokens (tokens [B, L]) replaced by their
        embedders' (placeholders too: the soft tokens overwrite those afterwards)."""
        for embedder, offset, size in self._embedders():
            mine = (tokens >= offset) & (tokens < offset + size)
            rows = embedder.embed_ids(jnp.where(mine, tokens, offset))
            x = jnp.where(mine[..., None], rows.astype(x.dtype), x)
        return x

    def encode_images(self, images: jax.Array) -> jax.Array:
        """images uint8 (or float in [0, 255]) [B, N, S, S, 3] -> soft tokens [B, N, T, D]."""
        batch, count = images.shape[:2]
        # What the processor does after its uint8 resize: rescale by float32(1/255).
        pixels = images.reshape((-1,) + images.shape[2:]).astype(jnp.float32) * RESCALE_FACTOR
        soft = self.embed_vision.embed_soft(self.vision_tower(pixels))
        return soft.reshape((batch, count) + soft.shape[1:])

    def encode_audio(self, audio: AudioInput) -> jax.Array:
        """Clips [B, M, T, F] -> soft tokens [B, M, audio_soft_tokens, D]."""
        cfg = self.config
        audio = check_audio(audio, None, audio.mel.shape[0], cfg)
        batch, count, frames = audio.mel.shape[:3]
        made = cfg.audio.soft_tokens(frames)
        mel = audio.mel.reshape((-1,) + audio.mel.shape[2:])
        tokens, valid = self.audio_tower(mel, audio.valid.reshape(-1, frames))
        soft = self.embed_audio.embed_soft(tokens)                           # [BM, S, D]
        pad = self.embed_audio.embed_ids(jnp.full((1, 1), cfg.audio_pad_id, jnp.int32))
        soft = jnp.where(valid[..., None], soft, pad)
        fill = jnp.broadcast_to(pad, (soft.shape[0], cfg.audio_soft_tokens - made, soft.shape[-1]))
        soft = jnp.concatenate([soft, fill], axis=1)
        return soft.reshape((batch, count) + soft.shape[1:])

    def init_all(self, tokens: jax.Array) -> None:
        """Creates every parameter during `init` (blank image, short blank clip)."""
        x = jnp.zeros(tokens.shape + (self.text_width,), jnp.float32)
        self.embed_ids(tokens, x)
        cfg = self.config
        if cfg.vision is not None:
            side = cfg.vision.image_size
            self.encode_images(jnp.zeros((1, 1, side, side, cfg.vision.in_channels), jnp.uint8))
        if cfg.audio is not None:
            frames = cfg.audio.time_stride * cfg.audio.reduction_factor
            self.encode_audio(AudioInput(jnp.zeros((1, 1, frames, cfg.audio.input_feat_size)),
                                         jnp.ones((1, 1, frames), bool)))
