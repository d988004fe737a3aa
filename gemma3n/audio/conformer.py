"""One conformer block of the audio encoder and its four sub-layers.

    x -> x + residual_weight * FFN(x)          (`ffw_layer_start`)
      -> x + Norm(Post(Attention(Norm(x))))    (`attention`)
      -> x + LightConv(x * valid)              (`lconv1d`: padded frames zeroed first)
      -> x + residual_weight * FFN(x)          (`ffw_layer_end`)
      -> Norm(x)                               (`norm`)

Each sub-layer clips its activations to +-gradient_clipping where the checkpoint's reference does.

Example:
    >>> block = ConformerBlock(AudioConfig())
    >>> y = block.apply({'params': p}, x, valid)          # [B, T, 1536], [B, T] -> [B, T, 1536]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma3n.audio.attention import LocalAttention
from gemma3n.audio.config import AudioConfig
from gemma3n.layers.einsum import weight_init
from gemma3n.layers.norm import RMSNorm
from gemma3n.layers.projection import Projection
from gemma3n.layers.weights import declare

FFW_EXPANSION = 4
# Norms that the checkpoint's reference builds with its default epsilon, not the config's.
DEFAULT_NORM_EPS = 1e-6
EMBED_AXES = ('audio_embed', 'audio_embed_in')


def _norm(eps: float, dtype: Any, name: str) -> RMSNorm:
    """An RMS norm over the model width times its learned `scale` [D] (not 1 + scale)."""
    return RMSNorm(eps=eps, axis_name='audio_embed', dtype=dtype, name=name)


def _clip(x: jax.Array, config: AudioConfig) -> jax.Array:
    return jnp.clip(x, -config.gradient_clipping, config.gradient_clipping)


class FeedForward(nn.Module):
    """Half-step feed-forward: `pre_layer_norm` -> `ffw_layer_1` (D -> 4D) -> SiLU ->
    `ffw_layer_2` (4D -> D) -> `post_layer_norm`, added with weight `residual_weight`."""
    config: AudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        cfg = self.config
        h = _norm(DEFAULT_NORM_EPS, self.dtype, 'pre_layer_norm')(_clip(x, cfg))
        h = Projection(FFW_EXPANSION * cfg.hidden_size, ('audio_ffw', 'audio_embed'), self.dtype,
                       name='ffw_layer_1')(h)
        h = Projection(cfg.hidden_size, ('audio_embed', 'audio_ffw'), self.dtype,
                       name='ffw_layer_2')(jax.nn.silu(h))
        h = _norm(DEFAULT_NORM_EPS, self.dtype, 'post_layer_norm')(_clip(h, cfg))
        return x + h * cfg.residual_weight


class ConformerAttention(nn.Module):
    """`pre_attn_norm` -> `attn` (local attention) -> `post` (D -> D) -> `post_norm`, residual."""
    config: AudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        """x: [B, T, D], valid: bool [B, T] -> [B, T, D]."""
        cfg = self.config
        h = _norm(DEFAULT_NORM_EPS, self.dtype, 'pre_attn_norm')(_clip(x, cfg))
        h = LocalAttention(cfg, self.dtype, name='attn')(h, valid)
        h = Projection(cfg.hidden_size, EMBED_AXES, self.dtype,
                       name='post')(h.reshape(x.shape))
        return x + _norm(DEFAULT_NORM_EPS, self.dtype, 'post_norm')(_clip(h, cfg))


class DepthwiseCausalConv(nn.Module):
    """Per-channel causal 1-D convolution, `kernel` [D, 1, K]: frame t reads frames t-K+1..t."""
    kernel_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        channels = x.shape[-1]
        kernel = declare(self, 'kernel', (channels, 1, self.kernel_size),
                         ('audio_embed', 'audio_conv_group', 'audio_conv_time'),
                         weight_init(in_axis=(1, 2), out_axis=0), self.dtype)
        padded = jnp.pad(x, ((0, 0), (self.kernel_size - 1, 0), (0, 0)))
        taps = kernel[:, 0, :].astype(x.dtype)                                 # [D, K]
        return sum(padded[:, k:k + x.shape[1]] * taps[:, k] for k in range(self.kernel_size))


class LightConv1d(nn.Module):
    """`pre_layer_norm` -> `linear_start` (D -> 2D) -> GLU -> `depthwise_conv1d` ->
    `conv_norm` -> SiLU -> `linear_end` (D -> D), residual."""
    config: AudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] (padded frames already zero) -> [B, T, D]."""
        cfg = self.config
        h = _norm(cfg.rms_norm_eps, self.dtype, 'pre_layer_norm')(x)
        h = Projection(2 * cfg.hidden_size, ('audio_glu', 'audio_embed'), self.dtype,
                       name='linear_start')(h)
        values, gates = jnp.split(h, 2, axis=-1)
        h = values * jax.nn.sigmoid(gates)
        h = DepthwiseCausalConv(cfg.conv_kernel_size, self.dtype, name='depthwise_conv1d')(h)
        h = _norm(cfg.rms_norm_eps, self.dtype, 'conv_norm')(_clip(h, cfg))
        h = Projection(cfg.hidden_size, EMBED_AXES, self.dtype, name='linear_end')(jax.nn.silu(h))
        return x + h


class ConformerBlock(nn.Module):
    """FFN half-step, local attention, light convolution, FFN half-step, final `norm`."""
    config: AudioConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        """x: [B, T, D], valid: bool [B, T] -> [B, T, D]."""
        cfg = self.config
        x = FeedForward(cfg, self.dtype, name='ffw_layer_start')(x)
        x = ConformerAttention(cfg, self.dtype, name='attention')(x, valid)
        # Padded frames enter the convolution as zeros, as in the checkpoint's reference (they
        # follow a clip's real frames, so the causal convolution never carries them into one).
        x = LightConv1d(cfg, self.dtype, name='lconv1d')(x * valid[..., None].astype(x.dtype))
        x = FeedForward(cfg, self.dtype, name='ffw_layer_end')(x)
        return _norm(DEFAULT_NORM_EPS, self.dtype, 'norm')(_clip(x, cfg))
