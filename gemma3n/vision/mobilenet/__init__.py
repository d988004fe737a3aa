"""MobileNet-V5, the vision tower of the released Gemma 3n checkpoints (timm `mobilenetv5_300m_enc`).

Images -> `preprocess_images` (768 x 768, [0, 1]) -> `MobileNetV5` (stem, edge-residual /
inverted-bottleneck / multi-query-attention stages, multi-scale fusion adapter) -> 256 soft tokens
of 2048 per image. `gemma3n.multimodal_embedder.MultimodalEmbedder` projects them into the text
model's space; `gemma3n.checkpoints.hf_mobilenet` loads both from a Hugging Face checkpoint.

Example:
    >>> from gemma3n.vision.mobilenet import MOBILENET_V5_300M, MobileNetV5, preprocess_images
    >>> from gemma3n.checkpoints.hf_mobilenet import load_vision, vision_embedder
    >>> tower, embed = load_vision('/ckpts/gemma-3n-E4B-it', MOBILENET_V5_300M, text_width=2048)
    >>> tokens = MobileNetV5(MOBILENET_V5_300M).apply({'params': tower},
    ...                                               preprocess_images(['cat.jpg']))  # [1, 256, 2048]
    >>> x = vision_embedder(MOBILENET_V5_300M, 2048).apply(
    ...     {'params': embed}, tokens, method=MultimodalEmbedder.embed_soft)         # [1, 256, 2048]
"""

from gemma3n.vision.mobilenet.config import (
    MOBILENET_V5_300M,
    EdgeResidual,
    InvertedBottleneck,
    MobileNetConfig,
    MultiQueryAttention,
)
from gemma3n.vision.mobilenet.encoder import MobileNetV5
from gemma3n.vision.mobilenet.preprocess import IMAGE_SIZE, preprocess_image, preprocess_images

__all__ = [
    "IMAGE_SIZE",
    "MOBILENET_V5_300M",
    "EdgeResidual",
    "InvertedBottleneck",
    "MobileNetConfig",
    "MobileNetV5",
    "MultiQueryAttention",
    "preprocess_image",
    "preprocess_images",
]
