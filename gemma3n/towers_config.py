"""Which released towers a Gemma 3n model has, and how their inputs enter the text.

The released checkpoints (`google/gemma-3n-E4B(-it)`, `E2B(-it)`) carry a MobileNet-V5 vision
tower and a conformer audio tower, each with a multimodal embedder (docs/architecture.md §5).
`TowersConfig` says which of the two a model has and the token ids of their blocks; it is the
`towers` field of `TransformerConfig` (the seed's SigLIP encoder is the other, exclusive, kind
of vision: `TransformerConfig.vision_encoder`). `gemma3n.checkpoints.hf_towers` builds it from
a config.json.

Ids (the released values, HF `Gemma3nConfig`): the vision embedder's 128 hard tokens start at
262144 (`<end_of_image>` 262144, `<image_soft_token>` 262145), the audio embedder's 128 at
262272 (`<end_of_audio>` 262272, `<audio_soft_token>` 262273); `<start_of_image>` 255999 and
`<start_of_audio>` 256000 are text tokens. The prompt's markers are the start tokens.

Example:
    >>> towers = TowersConfig()                       # MobileNet-V5 + audio, as released
    >>> towers.image_ids.placeholder, towers.image_soft_tokens, towers.audio_soft_tokens
    (262145, 256, 188)
"""

from __future__ import annotations

import dataclasses

from gemma3n.audio.config import AudioConfig
from gemma3n.layers.norm import RMS_NORM_EPS
from gemma3n.multimodal import BlockIds
from gemma3n.vision.mobilenet.config import MOBILENET_V5_300M, MobileNetConfig

# The released model's block ids and sizes (HF `Gemma3nConfig` defaults).
RELEASED_IMAGE_IDS = BlockIds(marker=255_999, placeholder=262_145, end=262_144)
RELEASED_AUDIO_IDS = BlockIds(marker=256_000, placeholder=262_273, end=262_272)
VISION_VOCAB_SIZE = 128
VISION_VOCAB_OFFSET = 262_144
AUDIO_SOFT_TOKENS = 188          # a 30 s clip; shorter clips are padded to it


@dataclasses.dataclass(frozen=True)
class TowersConfig:
    """The released towers of a model: `vision` and/or `audio` (None: the model has no such
    tower), their embedders' hard-token ranges, and the blocks their inputs become.

    `audio_soft_tokens` is what every clip's block holds: clips that give fewer soft tokens are
    padded with the embedding of the audio embedder's last hard token (as `transformers` does).
    """
    vision: MobileNetConfig | None = MOBILENET_V5_300M
    audio: AudioConfig | None = AudioConfig()
    vision_vocab_size: int = VISION_VOCAB_SIZE
    vision_vocab_offset: int = VISION_VOCAB_OFFSET
    vision_embed_eps: float = RMS_NORM_EPS
    image_ids: BlockIds = RELEASED_IMAGE_IDS
    audio_ids: BlockIds = RELEASED_AUDIO_IDS
    audio_soft_tokens: int = AUDIO_SOFT_TOKENS

    def __post_init__(self):
        if self.vision is None and self.audio is None:
            raise ValueError('TowersConfig needs a vision or an audio tower (use towers=None '
                             'for a text-only model).')
        if self.vision is not None:
            self._check_in_range('image', self.image_ids, self.vision_vocab_offset,
                                 self.vision_vocab_size)
        if self.audio is not None:
            self._check_in_range('audio', self.audio_ids, self.audio.vocab_offset,
                                 self.audio.vocab_size)

    @staticmethod
    def _check_in_range(kind: str, ids: BlockIds, offset: int, size: int) -> None:
        inside = [name for name, value in (('placeholder', ids.placeholder), ('end', ids.end))
                  if not offset <= value < offset + size]
        if inside:
            raise ValueError(f'the {kind} block\'s {" and ".join(inside)} id(s) must be hard '
                             f'tokens of its embedder, in [{offset}, {offset + size}); got {ids}.')

    @property
    def image_soft_tokens(self) -> int:
        return self.vision.num_soft_tokens

    @property
    def audio_pad_id(self) -> int:
        """The hard token whose embedding pads a clip's soft tokens (the audio vocabulary's last)."""
        return self.audio.vocab_offset + self.audio.vocab_size - 1

    @property
    def hard_token_end(self) -> int:
        """One past the largest hard-token id of the towers."""
        ends = [self.vision_vocab_offset + self.vision_vocab_size] if self.vision else []
        if self.audio is not None:
            ends.append(self.audio.vocab_offset + self.audio.vocab_size)
        return max(ends)
