"""Configuration of the MobileNet-V5 vision encoder: the block list and the fusion adapter.

The released Gemma 3n tower is timm's `mobilenetv5_300m_enc` (`MOBILENET_V5_300M`): a 3x3 stride-2
stem, four stages of blocks, and a multi-scale fusion adapter (MSFA) over the outputs of the last
two stages, giving a 16 x 16 grid of 2048-wide soft tokens for a 768 x 768 image. Three block
kinds make up the stages:

- `EdgeResidual` (timm `er`): a full k x k expansion conv, then a 1 x 1 projection.
- `InvertedBottleneck` (timm `uir`, universal inverted bottleneck): optional depthwise conv at the
  start, 1 x 1 expansion, optional depthwise conv in the middle, 1 x 1 projection, layer scale.
- `MultiQueryAttention` (timm `mqa`, mobile multi-query attention): RMS norm, attention with
  `num_heads` query heads and one shared key/value head (keys/values optionally downsampled by a
  strided depthwise conv), layer scale.

Only the first block of a stage may be strided; a stage's blocks are listed in order.

Example:
    >>> config = MOBILENET_V5_300M
    >>> config.num_soft_tokens, config.hidden_size
    (256, 2048)
"""

from __future__ import annotations

import dataclasses

# Every norm in the tower is an RMS norm over channels with this epsilon (timm `RmsNorm2d`).
RMS_NORM_EPS = 1e-6
# Channel counts of expansions are rounded to multiples of this (timm `make_divisible`).
CHANNEL_DIVISOR = 8
# make_divisible never rounds a channel count down by more than this fraction.
ROUND_LIMIT = 0.9
# Residual branches of UIB and attention blocks are scaled per channel; this is timm's initial
# value, so a fresh tower starts close to the identity.
LAYER_SCALE_INIT = 1e-5
STEM_KERNEL = 3
STEM_STRIDE = 2


def make_divisible(value: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """`value` rounded to the nearest multiple of `divisor` (at least `divisor`), bumped up one
    multiple when rounding would lose more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < ROUND_LIMIT * value:
        rounded += divisor
    return rounded


@dataclasses.dataclass(frozen=True)
class EdgeResidual:
    """Full conv `kernel` x `kernel` (stride `stride`) to `in * expansion` channels, 1 x 1 back to
    `out_channels`; residual when the shape is kept."""
    out_channels: int
    kernel: int = 3
    stride: int = 1
    expansion: float = 4.0


@dataclasses.dataclass(frozen=True)
class InvertedBottleneck:
    """Universal inverted bottleneck. `start_kernel` / `mid_kernel` 0 means no such depthwise
    conv; the stride goes to the middle conv when there is one, else to the start conv."""
    out_channels: int
    start_kernel: int = 0
    mid_kernel: int = 0
    stride: int = 1
    expansion: float = 2.0


@dataclasses.dataclass(frozen=True)
class MultiQueryAttention:
    """Mobile multi-query attention: `num_heads` query heads of `key_dim`, one key and one value
    head of `key_dim` computed from the input downsampled by `kv_stride` (a depthwise
    `kv_kernel` conv) when `kv_stride > 1`."""
    out_channels: int
    num_heads: int
    key_dim: int
    kv_stride: int = 1
    kv_kernel: int = 3


BlockSpec = EdgeResidual | InvertedBottleneck | MultiQueryAttention


@dataclasses.dataclass(frozen=True)
class MobileNetConfig:
    """Sizes of the whole tower.

    `msfa_stages` are the stages (0-based) whose outputs the fusion adapter concatenates (after
    upsampling all to the first one's resolution); its output is pooled to
    `msfa_resolution` x `msfa_resolution` tokens of `hidden_size`.
    """
    stages: tuple[tuple[BlockSpec, ...], ...]
    stem_channels: int = 64
    in_channels: int = 3
    hidden_size: int = 2048
    msfa_stages: tuple[int, ...] = (2, 3)
    msfa_expansion: float = 2.0
    msfa_resolution: int = 16
    image_size: int = 768

    def __post_init__(self):
        for stage, blocks in enumerate(self.stages):
            if not blocks:
                raise ValueError(f"stage {stage} of the MobileNet config has no blocks")
            for index, block in enumerate(blocks[1:], start=1):
                if _stride(block) != 1:
                    raise ValueError(f"only the first block of a stage may be strided; stage "
                                     f"{stage} block {index} has stride {_stride(block)}")
        stages = self.msfa_stages
        if not stages or list(stages) != sorted(set(stages)) or not (
                0 <= stages[0] and stages[-1] < len(self.stages)):
            raise ValueError(f"msfa_stages must be increasing stage indices in 0.."
                             f"{len(self.stages) - 1} (the first at the highest resolution); "
                             f"got {stages}")

    @property
    def num_soft_tokens(self) -> int:
        return self.msfa_resolution * self.msfa_resolution

    def stage_channels(self, stage: int) -> int:
        return self.stages[stage][-1].out_channels

    @property
    def msfa_in_channels(self) -> int:
        return sum(self.stage_channels(stage) for stage in self.msfa_stages)


def _stride(block: BlockSpec) -> int:
    return getattr(block, "stride", 1)


def _mobilenet_v5_300m() -> MobileNetConfig:
    """timm `mobilenetv5_300m_enc` (Gemma 3n E2B and E4B)."""
    uib, mqa = InvertedBottleneck, MultiQueryAttention
    stage0 = (EdgeResidual(128, 3, 2, 4.0),) + (EdgeResidual(128, 3, 1, 4.0),) * 2
    stage1 = ((uib(256, 3, 5, 2, 6.0),)
              + (uib(256, 5, 0, 1, 4.0), uib(256, 3, 0, 1, 4.0)) * 2)
    stage2 = ((uib(640, 5, 5, 2, 6.0),) + (uib(640, 5, 0, 1, 4.0),) * 7
              + (uib(640, 0, 0, 1, 1.0),)
              + (mqa(640, 12, 64, kv_stride=2), uib(640, 0, 0, 1, 2.0)) * 14)
    stage3 = ((uib(1280, 5, 5, 2, 6.0),)
              + (mqa(1280, 16, 96), uib(1280, 0, 0, 1, 2.0)) * 19)
    return MobileNetConfig(stages=(stage0, stage1, stage2, stage3))


MOBILENET_V5_300M = _mobilenet_v5_300m()
