"""The MobileNet-V5 vision tower at its real size on one 768 x 768 image: ours vs transformers + timm.

Builds timm's `mobilenetv5_300m_enc` through transformers (`Gemma3nVisionConfig` ->
`TimmWrapperModel`, 294M parameters) with random float32 weights (convolutions N(0, 1/fan_in),
norm scales 1 + N(0, 0.01), layer scales U(0.5, 1.5), so that every block's branch carries signal),
maps them into our tree, and runs one photo-like image through both: preprocessing (against
transformers' PIL image processor, which rounds some pixels one grey level apart from torch's
resize that ours reproduces), the tower (both on our pixels) and the vision embedder (2048 -> 2048,
E4B's text width). Prints times (first call: our compilation included; warm: best of `--repeats`)
and the largest differences, and writes them as JSON to `bench/results/vision-<UTC time>.json`.

Needs timm (installed as the README's test command does); torchvision, which timm imports but
this tower never calls, stands in as tests/torchvision_standin.py arranges where it is missing.
Slow on a small machine (minutes); run by hand from the repository root:
    python -m bench.vision_tower [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time

import jax
import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, Gemma3nTextConfig, Gemma3nVisionConfig
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nMultimodalEmbedder
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from bench.common import RESULTS_DIR
from gemma3n.checkpoints import hf_mobilenet
from gemma3n.multimodal_embedder import MultimodalEmbedder
from gemma3n.vision.mobilenet.config import MOBILENET_V5_300M
from gemma3n.vision.mobilenet.encoder import MobileNetV5
from gemma3n.vision.mobilenet.preprocess import preprocess_images
from tests.torchvision_standin import import_timm, timm_in_transformers

TEXT_WIDTH = 2048            # E4B's hidden size (E2B: 2048 as well)
IMAGE_SHAPE = (683, 1024)    # a landscape photo's shape, resized to 768 x 768
SCALE_NOISE = 0.1


def photo(height: int, width: int) -> np.ndarray:
    """Colour gradients with sensor-like noise, uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([np.sin(6 * x + 1), np.cos(4 * y), np.sin(3 * x * y + 2)], -1) * 90 + 128
    noise = np.random.default_rng(0).normal(0, 12, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def randomise(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 4:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("gamma"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif param.ndim == 1:
                param.add_(SCALE_NOISE * noise)


def timed(fn, repeats: int) -> tuple[object, float, float]:
    """(result, first call seconds, best warm seconds)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    return result, first, min(warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    try:
        import_timm()     # transformers builds the tower through timm
    except ImportError as error:
        sys.exit(f"bench.vision_tower needs timm (pip install --no-deps 'timm>=1.0.16'): {error}")
    torch.set_grad_enabled(False)
    report: dict[str, object] = {"torch_threads": torch.get_num_threads(),
                                 "jax_devices": [str(d) for d in jax.devices()]}

    image = Image.fromarray(photo(*IMAGE_SHAPE))
    processor = SiglipImageProcessorPil(do_convert_rgb=True, do_normalize=False, do_rescale=True,
                                        do_resize=True, resample=2, rescale_factor=1 / 255,
                                        size={"height": 768, "width": 768})
    ours_pixels, _, ours_pre = timed(lambda: preprocess_images([image]), args.repeats)
    hf_pixels, _, hf_pre = timed(
        lambda: processor(images=image, return_tensors="np")["pixel_values"], args.repeats)
    report["preprocess"] = {"ours_s": ours_pre, "hf_pil_s": hf_pre, "max_abs_diff": float(
        np.abs(ours_pixels - hf_pixels.transpose(0, 2, 3, 1)).max())}

    with timm_in_transformers():
        tower = AutoModel.from_config(Gemma3nVisionConfig()).eval()
    randomise(tower)
    embedder = Gemma3nMultimodalEmbedder(Gemma3nVisionConfig(),
                                         Gemma3nTextConfig(hidden_size=TEXT_WIDTH)).eval()
    randomise(embedder)
    state = {f"model.vision_tower.{k}": v.numpy() for k, v in tower.state_dict().items()}
    state.update({f"model.embed_vision.{k}": v.numpy() for k, v in embedder.state_dict().items()})
    start = time.perf_counter()
    params = jax.device_put(hf_mobilenet.vision_tower_from_hf(state, MOBILENET_V5_300M))
    embed_params = jax.device_put(
        hf_mobilenet.embed_vision_from_hf(state, MOBILENET_V5_300M, TEXT_WIDTH))
    report["map_weights_s"] = time.perf_counter() - start
    report["tower_params"] = sum(p.numel() for p in tower.parameters())

    encoder = jax.jit(MobileNetV5(MOBILENET_V5_300M).apply)
    vision_embedder = jax.jit(functools.partial(
        hf_mobilenet.vision_embedder(MOBILENET_V5_300M, TEXT_WIDTH).apply,
        method=MultimodalEmbedder.embed_soft))
    pixels = jax.device_put(ours_pixels)
    ours_tokens, ours_first, ours_warm = timed(
        lambda: encoder({"params": params}, pixels).block_until_ready(), args.repeats)
    hf_input = torch.from_numpy(np.ascontiguousarray(ours_pixels.transpose(0, 3, 1, 2)))

    def hf_tokens():
        out = tower(pixel_values=hf_input, do_pooling=False).last_hidden_state
        return out.reshape(1, 2048, -1).permute(0, 2, 1)
    theirs, hf_first, hf_warm = timed(hf_tokens, args.repeats)
    ours_tokens, theirs = np.asarray(ours_tokens), theirs.numpy()
    report["tower"] = {"ours_first_s": ours_first, "ours_warm_s": ours_warm,
                       "hf_first_s": hf_first, "hf_warm_s": hf_warm,
                       "shape": list(ours_tokens.shape),
                       "max_abs_diff": float(np.abs(ours_tokens - theirs).max()),
                       "max_abs_value": float(np.abs(theirs).max())}

    ours_features = np.asarray(vision_embedder({"params": embed_params}, ours_tokens))
    hf_features = embedder(inputs_embeds=torch.from_numpy(theirs) * 2048 ** 0.5).numpy()
    report["image_features"] = {
        "shape": list(ours_features.shape),
        "max_abs_diff": float(np.abs(ours_features - hf_features).max()),
        "max_abs_value": float(np.abs(hf_features).max())}

    print(json.dumps(report, indent=2))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"vision-{stamp}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
