"""The Gemma 3n audio encoder: log-mel frames -> audio soft tokens.

    mel [B, T, 128] -> sub-sample convolution projection [B, T/4, D] -> conformer blocks
    -> every `reduction_factor`-th frame [B, ceil(T/16), D], padded frames zeroed.

A 30 s clip (2997 mel frames) gives 188 soft tokens of width 1536 at the released size. The
validity mask follows the frames down: an encoder frame is real when the mel frame its
convolution window starts at is real.

Parameter names are those of the checkpoint's `audio_tower` (`subsample_conv_projection/...`,
`conformer_{i}/...`; `gemma3n.checkpoints.hf_audio` maps them).

Example:
    >>> encoder = AudioEncoder(AudioConfig())
    >>> params = init_params(encoder, jax.random.key(0), mel, valid)
    >>> tokens, token_valid = encoder.apply({'params': params}, mel, valid)   # [B, 188, 1536]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.audio.config import AudioConfig
from gemma3n.audio.conformer import ConformerBlock
from gemma3n.audio.subsample import SubSampleConvProjection

MEL_RANK = 3


class AudioEncoder(nn.Module):
    """USM-style conformer encoder of Gemma 3n's audio tower."""
    config: AudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mel: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes a batch of log-mel spectrograms.

        Args:
            mel: [B, T, input_feat_size] log-mel frames (`gemma3n.audio.features`).
            valid: bool [B, T], False on the frames that pad a clip to the batch's length.
        Returns:
            soft tokens [B, S, D] with S = config.soft_tokens(T), zero where not valid;
            their validity, bool [B, S].
        """
        cfg = self.config
        if mel.ndim != MEL_RANK or mel.shape[-1] != cfg.input_feat_size:
            raise ValueError(f'mel must be [B, T, {cfg.input_feat_size}], got shape '
                             f'{tuple(mel.shape)}.')
        if valid.shape != mel.shape[:2]:
            raise ValueError(f'valid must be [B, T] = {tuple(mel.shape[:2])}, got shape '
                             f'{tuple(valid.shape)}.')
        x = SubSampleConvProjection(cfg, self.dtype, name='subsample_conv_projection')(
            mel.astype(self.dtype))
        starts = np.minimum(np.arange(x.shape[1]) * cfg.time_stride, mel.shape[1] - 1)
        valid = jnp.asarray(valid, bool)[:, starts]                          # [B, T/4]
        for i in range(cfg.num_layers):
            x = ConformerBlock(cfg, self.dtype, name=f'conformer_{i}')(x, valid)
        x = x[:, ::cfg.reduction_factor]
        valid = valid[:, ::cfg.reduction_factor]
        return jnp.where(valid[..., None], x, 0), valid
