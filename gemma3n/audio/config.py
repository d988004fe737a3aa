"""Configuration of the Gemma 3n audio encoder (a USM-style conformer) and its sizes.

`AudioConfig` holds every size of the tower; `AudioConfig()` is the released one (identical in
E4B and E2B). The derived sizes (frequency bins after each sub-sample convolution, soft tokens of
a clip) are computed here once so the modules and the checkpoint mapping agree on them.
"""

from __future__ import annotations

import dataclasses

# Released sizes (E4B and E2B carry the same audio tower).
AUDIO_HIDDEN = 1536
AUDIO_LAYERS = 12
AUDIO_HEADS = 8
MEL_BINS = 128
# The hard-token table of the audio embedder: 128 ids after the text (262144) and vision (128) ids.
AUDIO_VOCAB_SIZE = 128
AUDIO_VOCAB_OFFSET = 262_144 + 128
# The sub-sample convolutions pad the frequency axis by one bin on each side whatever the kernel
# (the checkpoint was trained that way) and the time axis only after the frame ("reverse causal").
FREQ_PAD = 1


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Length of a VALID strided convolution over `size + pad` elements."""
    return (size + pad - kernel) // stride + 1


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """Sizes and switches of the audio tower.

    The attention is local: frames are cut into chunks of `chunk_size` queries, each attending
    to `context_left - 1` frames before it, itself, and `context_right` frames after.
    """
    hidden_size: int = AUDIO_HIDDEN
    num_layers: int = AUDIO_LAYERS
    num_heads: int = AUDIO_HEADS
    input_feat_size: int = MEL_BINS
    chunk_size: int = 12
    context_left: int = 13
    context_right: int = 0
    logit_cap: float = 50.0
    conv_kernel_size: int = 5
    reduction_factor: int = 4
    residual_weight: float = 0.5
    # Activations are clipped to +-gradient_clipping around each sub-layer (no-op at this size,
    # kept because the checkpoint's numerics include it).
    gradient_clipping: float = 1e10
    rms_norm_eps: float = 1e-6
    sscp_channels: tuple[int, ...] = (128, 32)
    sscp_kernels: tuple[tuple[int, int], ...] = ((3, 3), (3, 3))
    sscp_strides: tuple[tuple[int, int], ...] = ((2, 2), (2, 2))
    sscp_group_norm_eps: float = 1e-3
    vocab_size: int = AUDIO_VOCAB_SIZE
    vocab_offset: int = AUDIO_VOCAB_OFFSET

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f'hidden_size {self.hidden_size} is not a multiple of num_heads '
                             f'{self.num_heads}.')
        if self.hidden_size % 2:
            raise ValueError(f'hidden_size must be even (sine/cosine position signal), got '
                             f'{self.hidden_size}.')
        sizes = {len(self.sscp_channels), len(self.sscp_kernels), len(self.sscp_strides)}
        if len(sizes) != 1:
            raise ValueError('sscp_channels, sscp_kernels and sscp_strides must have one entry per '
                             'convolution.')
        if self.context_left < 1 or self.context_right < 0 or self.chunk_size < 1:
            raise ValueError('need chunk_size >= 1, context_left >= 1, context_right >= 0.')

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_past(self) -> int:
        """Frames before a query that it sees (the query itself counts in `context_left`)."""
        return self.context_left - 1

    @property
    def context_size(self) -> int:
        """Keys a chunk of queries reads: the chunk and its past and future horizons."""
        return self.chunk_size + self.max_past + self.context_right

    @property
    def sscp_freq_sizes(self) -> tuple[int, ...]:
        """Frequency bins after each sub-sample convolution."""
        sizes, size = [], self.input_feat_size
        for (_, kernel), (_, stride) in zip(self.sscp_kernels, self.sscp_strides):
            size = conv_output_size(size, kernel, stride, 2 * FREQ_PAD)
            sizes.append(size)
        return tuple(sizes)

    @property
    def time_stride(self) -> int:
        """Mel frames per encoder frame after the sub-sample convolutions."""
        stride = 1
        for time_stride, _ in self.sscp_strides:
            stride *= time_stride
        return stride

    def encoder_frames(self, mel_frames: int) -> int:
        """Encoder frames (before the reduction) of `mel_frames` log-mel frames."""
        for (kernel, _), (stride, _) in zip(self.sscp_kernels, self.sscp_strides):
            mel_frames = conv_output_size(mel_frames, kernel, stride, kernel - 1)
        return mel_frames

    def soft_tokens(self, mel_frames: int) -> int:
        """Soft tokens the encoder returns for `mel_frames` frames (188 for 30 s at full size)."""
        return -(-self.encoder_frames(mel_frames) // self.reduction_factor)
