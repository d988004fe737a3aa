"""Tests of the MobileNet-V5 vision tower (issue 16) that need neither timm nor torchvision: the HF
name mapping and its errors, the config from HF, loading from safetensors, bad input, the vision
embedder against transformers, and the preprocessing.

The HF tensors here are built from our own declared shapes (`hf_mobilenet.vision_tower_shapes`)
in PyTorch's layout (convolutions [out, in, kh, kw]), so the mapping is checked without timm; that
timm's `mobilenetv5_300m_enc` has exactly these names and shapes, and that the tower computes what
timm's does, is checked in test_mobilenet_timm.py.

The preprocessing oracles are torch's uint8 antialiased bilinear resize (what torchvision's
`resize` runs for uint8 images, so what transformers' default torchvision image processor
computes) and transformers' PIL image processor (the one it picks without torchvision).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file
from transformers import Gemma3nTextConfig, Gemma3nVisionConfig
from transformers.image_transforms import convert_to_rgb
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nMultimodalEmbedder
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from gemma3n.checkpoints import hf_mobilenet
from gemma3n.checkpoints.hf_mapping import flatten_params
from gemma3n.multimodal_embedder import MultimodalEmbedder
from gemma3n.vision.mobilenet import config as mnv5
from gemma3n.vision.mobilenet.encoder import MobileNetV5
from gemma3n.vision.mobilenet.preprocess import IMAGE_SIZE, preprocess_image, preprocess_images
from gemma3n.vision.mobilenet.resize import resize_uint8

# A small tower with every block kind (edge residual, UIB with start / middle / no depthwise
# convs, MMQA with and without key/value downsampling) and 16..48 channels.
_UIB, _MQA, _ER = mnv5.InvertedBottleneck, mnv5.MultiQueryAttention, mnv5.EdgeResidual
SMALL = mnv5.MobileNetConfig(
    stages=((_ER(16, 3, 2, 4.0), _ER(16, 3, 1, 4.0)),
            (_UIB(24, 3, 5, 2, 4.0), _UIB(24, 5, 0, 1, 2.0), _UIB(24, 0, 0, 1, 1.0)),
            (_UIB(32, 5, 5, 2, 3.0), _MQA(32, 4, 8, kv_stride=2), _UIB(32, 0, 0, 1, 2.0)),
            (_UIB(48, 5, 5, 2, 3.0), _MQA(48, 2, 16), _UIB(48, 0, 0, 1, 2.0))),
    stem_channels=16, msfa_resolution=2, image_size=64)
# SMALL in timm's block notation (what a HF vision_config's model_args give for it).
SMALL_ARCH = [
    ["er_r1_k3_s2_e4_c16", "er_r1_k3_s1_e4_c16"],
    ["uir_r1_a3_k5_s2_e4_c24", "uir_r1_a5_k0_s1_e2_c24", "uir_r1_a0_k0_s1_e1_c24"],
    ["uir_r1_a5_k5_s2_e3_c32", "mqa_r1_k3_h4_v2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"],
    ["uir_r1_a5_k5_s2_e3_c48", "mqa_r1_k3_h2_s1_d16_c48", "uir_r1_a0_k0_s1_e2_c48"],
]
HIDDEN = 2048                  # timm's MobileNetV5Encoder output width, fixed
TEXT_WIDTH = 64
BATCH = 2
# Random weights: matrices and convolutions N(0, 1 / fan_in) so every branch carries signal of
# order 1 (transformers' init, N(0, 0.02^2), shrinks each branch to ~1e-2), norm scales
# 1 + N(0, NOISE^2), layer scales U(0.5, 1.5) (timm's 1e-5 would hide every residual branch),
# biases N(0, NOISE^2).
NOISE = 0.1
# The embedder against transformers' in float32: an RMS norm, one projection, an RMS norm (values
# up to ~4); only summation order differs (measured 3e-6). A wrong eps, a missing sqrt(W) soft
# token scale or a transposed projection moves values by 1e-2 or more.
EMBED_TOL = 1e-4


def hf_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """PyTorch's shape of one of our leaves: convolutions [out, in, kh, kw], others as ours."""
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights as `NOISE` says, in place (transformers' embedder, timm's tower)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim in (2, 4):            # the embedder's table and projection, convs
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("gamma"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif param.ndim == 1:
                param.add_(NOISE * noise)


@pytest.fixture(scope="module")
def hf_state():
    """Random tensors of the small tower under their checkpoint names, in PyTorch's layout."""
    rng = np.random.default_rng(0)
    shapes = hf_mobilenet.vision_tower_shapes(SMALL)
    return {hf_mobilenet.HF_VISION_TOWER_PREFIX + hf_mobilenet.hf_name(path):
            rng.normal(size=hf_layout(shape)).astype(np.float32)
            for path, shape in shapes.items()}


@pytest.fixture(scope="module")
def params(hf_state):
    return hf_mobilenet.vision_tower_from_hf(hf_state, SMALL)


@pytest.fixture(scope="module")
def hf_embedder():
    embedder = Gemma3nMultimodalEmbedder(Gemma3nVisionConfig(),
                                         Gemma3nTextConfig(hidden_size=TEXT_WIDTH)).eval()
    randomise(embedder, seed=3)
    return embedder


@pytest.fixture(scope="module")
def embed_state(hf_embedder):
    return {hf_mobilenet.HF_EMBED_VISION_PREFIX + k: v.numpy()
            for k, v in hf_embedder.state_dict().items()}


def test_mapping_converts_layouts(hf_state, params):
    """Every tensor lands at its leaf: convolutions [out, in, kh, kw] -> [kh, kw, in, out]."""
    flat = {hf_mobilenet.hf_name(path): leaf
            for path, leaf in flatten_params(params).items()}
    assert len(flat) == len(hf_state)
    for name, array in hf_state.items():
        ours = flat[name.removeprefix(hf_mobilenet.HF_VISION_TOWER_PREFIX)]
        expected = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
        np.testing.assert_array_equal(ours, expected, err_msg=name)
    stem = params["conv_stem"]["conv"]["kernel"]
    assert stem.shape == (3, 3, 3, SMALL.stem_channels)     # [kh, kw, RGB, stem channels]


def test_vision_config_from_hf():
    assert hf_mobilenet.vision_config_from_hf(
        Gemma3nVisionConfig().to_dict()) == mnv5.MOBILENET_V5_300M
    small = Gemma3nVisionConfig(model_args=dict(
        block_args=SMALL_ARCH, stem_size=SMALL.stem_channels,
        msfa_output_resolution=SMALL.msfa_resolution)).to_dict()
    assert hf_mobilenet.vision_config_from_hf(small, image_size=SMALL.image_size) == SMALL
    custom = Gemma3nVisionConfig(model_args={"drop_rate": 0.1}).to_dict()
    with pytest.raises(ValueError, match=r"model_args \['drop_rate'\]"):
        hf_mobilenet.vision_config_from_hf(custom)
    bad = Gemma3nVisionConfig(model_args={"block_args": [["zz_r1_c8"]]}).to_dict()
    with pytest.raises(ValueError, match="cannot read timm block 'zz_r1_c8'"):
        hf_mobilenet.vision_config_from_hf(bad)
    other = Gemma3nVisionConfig(architecture="resnet50").to_dict()
    with pytest.raises(ValueError, match="architecture='resnet50'"):
        hf_mobilenet.vision_config_from_hf(other)


def test_mapping_reports_bad_tensors(hf_state):
    state = dict(hf_state)
    del state["model.vision_tower.timm_model.msfa.norm.weight"]
    state["model.vision_tower.timm_model.blocks.0.0.bn1.weight"] = np.zeros(3, np.float32)
    state["model.vision_tower.timm_model.extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as error:
        hf_mobilenet.vision_tower_from_hf(state, SMALL)
    message = str(error.value)
    for fragment in ("missing 1: model.vision_tower.timm_model.msfa.norm.weight",
                     "unexpected 1: model.vision_tower.timm_model.extra.weight",
                     "blocks.0.0.bn1.weight (3,) (expected (64,))"):
        assert fragment in message


def test_load_vision_reads_safetensors(tmp_path, hf_state, params, embed_state):
    state = {**hf_state, **embed_state}
    state["model.language_model.norm.weight"] = np.ones(4, np.float32)     # ignored
    save_file(state, tmp_path / "model.safetensors")
    tower, embedder = hf_mobilenet.load_vision(tmp_path, SMALL, TEXT_WIDTH)
    jax.tree.map(np.testing.assert_array_equal, tower, params)
    jax.tree.map(np.testing.assert_array_equal, embedder,
                 hf_mobilenet.embed_vision_from_hf(state, SMALL, TEXT_WIDTH))
    save_file({"model.language_model.norm.weight": np.ones(4, np.float32)},
              tmp_path / "text.safetensors")
    with pytest.raises(ValueError, match="no vision tensors"):
        hf_mobilenet.load_vision(tmp_path / "text.safetensors", SMALL, TEXT_WIDTH)


def test_encoder_rejects_wrong_pixels(params):
    with pytest.raises(ValueError, match=r"pixels \[batch, 64, 64, 3\]"):
        MobileNetV5(SMALL).apply({"params": params}, np.zeros((1, 32, 32, 3), np.float32))


def test_soft_tokens_match_embedder(hf_embedder, embed_state):
    """Soft tokens as `get_image_features` feeds them: times sqrt(2048), then the embedder."""
    embedder_params = hf_mobilenet.embed_vision_from_hf(embed_state, SMALL, TEXT_WIDTH)
    tokens = np.random.default_rng(4).normal(
        size=(BATCH, SMALL.num_soft_tokens, HIDDEN)).astype(np.float32)
    ours = np.asarray(hf_mobilenet.vision_embedder(SMALL, TEXT_WIDTH).apply(
        {"params": embedder_params}, tokens, method=MultimodalEmbedder.embed_soft))
    with torch.no_grad():
        theirs = hf_embedder(inputs_embeds=torch.from_numpy(tokens) * HIDDEN ** 0.5).numpy()
    assert ours.shape == theirs.shape == (BATCH, SMALL.num_soft_tokens, TEXT_WIDTH)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=EMBED_TOL)


def test_hard_tokens_match_embedder(hf_embedder, embed_state):
    embedder_params = hf_mobilenet.embed_vision_from_hf(embed_state, SMALL, TEXT_WIDTH)
    ids = hf_mobilenet.VISION_VOCAB_OFFSET + np.array([[0, 5, 127], [64, 1, 2]])
    ours = np.asarray(hf_mobilenet.vision_embedder(SMALL, TEXT_WIDTH).apply(
        {"params": embedder_params}, jnp.asarray(ids), method=MultimodalEmbedder.embed_ids))
    with torch.no_grad():
        theirs = hf_embedder(input_ids=torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=EMBED_TOL)


# --- preprocessing ---------------------------------------------------------------------------

def photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients, a few shapes and sensor-like noise, as uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([np.sin(6 * x + 1), np.cos(4 * y), np.sin(3 * x * y + 2)], -1) * 90 + 128
    for _ in range(5):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def torch_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] through torch's uint8 antialiased bilinear kernel (torchvision's resize)."""
    nchw = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    resized = torch.nn.functional.interpolate(nchw, size=(height, width), mode="bilinear",
                                              antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).numpy()


def torchvision_processor_steps(image: Image.Image) -> np.ndarray:
    """transformers' torchvision processor for Gemma 3n, step by step without torchvision:
    its RGB conversion, the uint8 resize, then the rescale (uint8 tensor * 1/255 -> float32)."""
    rgb = convert_to_rgb(image, return_numpy=True)
    return (torch.from_numpy(torch_resize(rgb, IMAGE_SIZE, IMAGE_SIZE)) * (1 / 255)).numpy()


@pytest.fixture(scope="module")
def pil_processor():
    # Gemma 3n's preprocessor_config.json, on the PIL backend transformers picks without
    # torchvision.
    return SiglipImageProcessorPil(do_convert_rgb=True, do_normalize=False, do_rescale=True,
                                   do_resize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                   resample=2, rescale_factor=1 / 255,
                                   size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


# Against torch's arithmetic preprocessing is exact up to float32 rounding of the final rescale
# (both sides multiply the same uint8 values by float32(1/255)); 1e-5 is 1/400 of one grey level.
PIXEL_TOL = 1e-5
# Pillow resizes with the same antialiased triangle filter but rounds its weights at 22 bits
# where torch uses the int16 precision, so some pixels land one grey level apart (measured: up to
# 21% of the pixels of a 1500 x 1100 image, never more than one level). A wrong filter, scale or
# pixel centre moves many pixels by several levels.
PIL_TOL = 1 / 255 + PIXEL_TOL


@pytest.mark.parametrize("height,width", [(683, 1024), (1500, 1100), (480, 500), (768, 500),
                                          (37, 53)])
def test_resize_is_torchs_uint8_kernel(height, width):
    """Bit for bit what torch computes, shrinking, enlarging and with one axis already right."""
    image = photo(height, width, seed=height)
    np.testing.assert_array_equal(resize_uint8(image, IMAGE_SIZE, IMAGE_SIZE),
                                  torch_resize(image, IMAGE_SIZE, IMAGE_SIZE))


@pytest.mark.parametrize("height,width", [(683, 1024), (1500, 1100), (480, 500), (768, 768)])
def test_preprocess_matches_processor(height, width, pil_processor):
    image = Image.fromarray(photo(height, width, seed=height))
    ours = preprocess_image(image)
    assert ours.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torchvision_processor_steps(image), rtol=0, atol=PIXEL_TOL)
    theirs = pil_processor(images=image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours, theirs.transpose(1, 2, 0), rtol=0, atol=PIL_TOL)


def test_preprocess_transparency_and_files(tmp_path, pil_processor):
    rgba = np.concatenate([photo(300, 400, 7), np.random.default_rng(8).integers(
        0, 256, (300, 400, 1), dtype=np.uint8)], axis=-1)
    path = tmp_path / "photo.png"
    Image.fromarray(rgba, "RGBA").save(path)
    grey = photo(200, 100, 9)[..., 0]
    ours = preprocess_images([path, grey])
    for index, image in enumerate([Image.open(path), Image.fromarray(grey, "L")]):
        np.testing.assert_allclose(ours[index], torchvision_processor_steps(image), rtol=0,
                                   atol=PIXEL_TOL)
        theirs = pil_processor(images=image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours[index], theirs.transpose(1, 2, 0), rtol=0, atol=PIL_TOL)


def test_preprocess_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8 array"):
        preprocess_images([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(FileNotFoundError, match="not found"):
        preprocess_images([tmp_path / "missing.png"])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image file"):
        preprocess_images([tmp_path / "text.png"])
