"""Tests of the MobileNet-V5 vision tower (issue 16, vision half): parity with transformers + timm
per block and end to end, the vision embedder, the HF mapping, and the preprocessing.

The oracle is timm's `mobilenetv5_300m_enc` built through transformers' `TimmWrapperModel` from a
`Gemma3nVisionConfig` whose `model_args` replace the block list by a small one with every block
kind (edge residual, UIB with start / middle / no depthwise convs, MMQA with and without
key/value downsampling) and 16..48 channels. timm fixes the adapter's output at 2048 channels,
so the small tower keeps that width. Images of 64 x 64 go through the average-pooling adapter
path; 80 x 80 images give odd feature sizes (asymmetric 'SAME' padding, 3 -> 5 nearest
upsampling) and the bilinear path. The real architecture is checked by names and shapes only.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models._efficientnet_builder import decode_arch_def
from transformers import AutoModel, Gemma3nTextConfig, Gemma3nVisionConfig
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nModel, Gemma3nMultimodalEmbedder
from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

from gemma3n.checkpoints import hf_mobilenet
from gemma3n.vision.mobilenet import config as mnv5
from gemma3n.vision.mobilenet.attention import MultiQueryAttentionBlock
from gemma3n.vision.mobilenet.blocks import EdgeResidualBlock, InvertedBottleneckBlock
from gemma3n.vision.mobilenet.encoder import MobileNetV5
from gemma3n.vision.mobilenet.msfa import MultiScaleFusionAdapter
from gemma3n.vision.mobilenet.preprocess import preprocess_image, preprocess_images

# The small tower, in timm's block notation and in ours.
SMALL_ARCH = [
    ["er_r1_k3_s2_e4_c16", "er_r1_k3_s1_e4_c16"],
    ["uir_r1_a3_k5_s2_e4_c24", "uir_r1_a5_k0_s1_e2_c24", "uir_r1_a0_k0_s1_e1_c24"],
    ["uir_r1_a5_k5_s2_e3_c32", "mqa_r1_k3_h4_v2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"],
    ["uir_r1_a5_k5_s2_e3_c48", "mqa_r1_k3_h2_s1_d16_c48", "uir_r1_a0_k0_s1_e2_c48"],
]
_UIB, _MQA, _ER = mnv5.InvertedBottleneck, mnv5.MultiQueryAttention, mnv5.EdgeResidual
SMALL = mnv5.MobileNetConfig(
    stages=((_ER(16, 3, 2, 4.0), _ER(16, 3, 1, 4.0)),
            (_UIB(24, 3, 5, 2, 4.0), _UIB(24, 5, 0, 1, 2.0), _UIB(24, 0, 0, 1, 1.0)),
            (_UIB(32, 5, 5, 2, 3.0), _MQA(32, 4, 8, kv_stride=2), _UIB(32, 0, 0, 1, 2.0)),
            (_UIB(48, 5, 5, 2, 3.0), _MQA(48, 2, 16), _UIB(48, 0, 0, 1, 2.0))),
    stem_channels=16, msfa_resolution=2, image_size=64)
SMALL_ODD = dataclasses.replace(SMALL, image_size=80)
HIDDEN = 2048                  # timm's MobileNetV5Encoder output width, fixed
TEXT_WIDTH = 64
BATCH = 2
# Random weights: convolutions N(0, 1 / fan_in) so every branch carries signal of order 1
# (transformers' init, N(0, 0.02^2), shrinks each branch to ~1e-2), norm scales 1 + N(0, NOISE^2),
# layer scales U(0.5, 1.5) (timm's 1e-5 would hide every residual branch), biases N(0, NOISE^2).
NOISE = 0.1
# float32 bound against torch. Both compute the same function in float32 and differ only in
# summation order (XLA vs oneDNN convolutions, fused vs eager attention): measured max
# differences are ~1e-6 on blocks and ~5e-6 on the tower's final-norm outputs (|x| up to ~5),
# 1e-4 leaves margin. A modelling error (GELU variant ~1e-3, eps, padding side, a wrong
# transpose, nearest vs bilinear) is far larger.
TOL = 1e-4


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 4:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("gamma"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif param.ndim == 1:
                param.add_(NOISE * noise)


@pytest.fixture(scope="module")
def hf_tower():
    config = Gemma3nVisionConfig(model_args=dict(
        block_args=decode_arch_def(SMALL_ARCH), stem_size=SMALL.stem_channels,
        msfa_output_resolution=SMALL.msfa_resolution))
    tower = AutoModel.from_config(config).eval()
    _randomise(tower, seed=0)
    return tower


@pytest.fixture(scope="module")
def hf_state(hf_tower):
    """The tower's tensors under their names in a Gemma3nForConditionalGeneration checkpoint."""
    return {f"model.vision_tower.{k}": v.numpy() for k, v in hf_tower.state_dict().items()}


@pytest.fixture(scope="module")
def params(hf_state):
    return hf_mobilenet.vision_tower_from_hf(hf_state, SMALL)


@pytest.fixture(scope="module")
def run_tower(params):
    """Our soft tokens for pixels of one of the small configs, one compilation per config."""
    compiled = {}

    def run(config: mnv5.MobileNetConfig, pixels: np.ndarray) -> np.ndarray:
        if config not in compiled:
            compiled[config] = jax.jit(MobileNetV5(config).apply)
        return np.asarray(compiled[config]({"params": params}, pixels))
    return run


def _pixels(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (BATCH, side, side, 3)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("config", [SMALL, SMALL_ODD], ids=["avg_pool", "odd_bilinear"])
def test_tower_matches_timm(config, hf_tower, run_tower):
    pixels = _pixels(config.image_size)
    ours = run_tower(config, pixels)
    with torch.no_grad():
        out = hf_tower(pixel_values=_nchw(pixels), do_pooling=False).last_hidden_state
    theirs = out.reshape(BATCH, HIDDEN, -1).permute(0, 2, 1).numpy()   # as get_image_features
    assert ours.shape == theirs.shape == (BATCH, config.num_soft_tokens, HIDDEN)
    assert np.abs(theirs).max() > 1.0                      # outputs are not trivially small
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


def _block_cases():
    return [("blocks_0_0", EdgeResidualBlock, SMALL.stages[0][0], (0, 0), 32, 16),
            ("blocks_0_1", EdgeResidualBlock, SMALL.stages[0][1], (0, 1), 16, 16),
            ("blocks_1_0", InvertedBottleneckBlock, SMALL.stages[1][0], (1, 0), 16, 16),
            ("blocks_1_1", InvertedBottleneckBlock, SMALL.stages[1][1], (1, 1), 8, 24),
            ("blocks_2_1", MultiQueryAttentionBlock, SMALL.stages[2][1], (2, 1), 7, 32),
            ("blocks_3_1", MultiQueryAttentionBlock, SMALL.stages[3][1], (3, 1), 3, 48)]


@pytest.mark.parametrize("name,cls,spec,index,side,channels", _block_cases(),
                         ids=[case[0] for case in _block_cases()])
def test_blocks_match_timm(name, cls, spec, index, side, channels, hf_tower, params):
    x = np.random.default_rng(1).normal(size=(BATCH, side, side, channels)).astype(np.float32)
    ours = np.asarray(cls(spec).apply({"params": params[name]}, x))
    with torch.no_grad():
        theirs = _nhwc(hf_tower.timm_model.blocks[index[0]][index[1]](_nchw(x)))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


def test_msfa_matches_timm(hf_tower, params):
    rng = np.random.default_rng(2)
    high = rng.normal(size=(BATCH, 4, 4, 32)).astype(np.float32)
    low = rng.normal(size=(BATCH, 2, 2, 48)).astype(np.float32)
    adapter = MultiScaleFusionAdapter(HIDDEN, SMALL.msfa_resolution, SMALL.msfa_expansion)
    ours = np.asarray(adapter.apply({"params": params["msfa"]}, [high, low]))
    with torch.no_grad():
        theirs = _nhwc(hf_tower.timm_model.msfa([_nchw(high), _nchw(low)]))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


@pytest.fixture(scope="module")
def hf_embedder():
    embedder = Gemma3nMultimodalEmbedder(Gemma3nVisionConfig(),
                                         Gemma3nTextConfig(hidden_size=TEXT_WIDTH)).eval()
    _randomise(embedder, seed=3)
    return embedder


def test_image_features_match_get_image_features(hf_tower, hf_embedder, run_tower):
    """Tower + embedder against transformers' own `get_image_features` on the same modules."""
    state = {f"model.embed_vision.{k}": v.numpy() for k, v in hf_embedder.state_dict().items()}
    embedder_params = hf_mobilenet.embed_vision_from_hf(state, SMALL, TEXT_WIDTH)
    pixels = _pixels(SMALL.image_size, seed=4)
    tokens = run_tower(SMALL, pixels)
    ours = np.asarray(hf_mobilenet.vision_embedder(SMALL, TEXT_WIDTH).apply(
        {"params": embedder_params}, tokens))
    model = types.SimpleNamespace(
        vision_tower=hf_tower, embed_vision=hf_embedder,
        config=types.SimpleNamespace(vision_config=hf_tower.config, return_dict=True,
                                     vision_soft_tokens_per_image=SMALL.num_soft_tokens))
    with torch.no_grad():
        theirs = Gemma3nModel.get_image_features(model, _nchw(pixels)).pooler_output.numpy()
    assert ours.shape == theirs.shape == (BATCH, SMALL.num_soft_tokens, TEXT_WIDTH)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


def test_hard_tokens_match_embedder(hf_embedder):
    state = {f"model.embed_vision.{k}": v.numpy() for k, v in hf_embedder.state_dict().items()}
    embedder_params = hf_mobilenet.embed_vision_from_hf(state, SMALL, TEXT_WIDTH)
    ids = hf_mobilenet.VISION_VOCAB_OFFSET + np.array([[0, 5, 127], [64, 1, 2]])
    ours = np.asarray(hf_mobilenet.vision_embedder(SMALL, TEXT_WIDTH).apply(
        {"params": embedder_params}, jnp.asarray(ids)))
    with torch.no_grad():
        theirs = hf_embedder(input_ids=torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


def test_real_architecture_maps_one_to_one_onto_timm():
    """Every tensor of timm's mobilenetv5_300m_enc has exactly one leaf of ours, same shape."""
    timm_model = timm.create_model("mobilenetv5_300m_enc", pretrained=False, num_classes=0,
                                   device="meta")
    theirs = {k: tuple(v.shape) for k, v in timm_model.state_dict().items()}
    shapes = hf_mobilenet.vision_tower_shapes(mnv5.MOBILENET_V5_300M)
    ours = {hf_mobilenet.hf_name(path): shape for path, shape in shapes.items()}
    assert set(ours) == set(theirs) and len(ours) == len(shapes)
    for name, shape in ours.items():
        hf_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
        assert hf_shape == theirs[name], name
    assert mnv5.MOBILENET_V5_300M.num_soft_tokens == 256


def test_vision_config_from_hf():
    assert hf_mobilenet.vision_config_from_hf(
        Gemma3nVisionConfig().to_dict()) == mnv5.MOBILENET_V5_300M
    custom = Gemma3nVisionConfig(model_args={"stem_size": 16}).to_dict()
    with pytest.raises(ValueError, match="model_args=.*supported: None"):
        hf_mobilenet.vision_config_from_hf(custom)
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


def test_load_vision_reads_safetensors(tmp_path, hf_state, params, hf_embedder):
    from safetensors.numpy import save_file
    state = dict(hf_state)
    state.update({f"model.embed_vision.{k}": v.numpy() for k, v in hf_embedder.state_dict().items()})
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


# --- preprocessing ---------------------------------------------------------------------------

def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients, a few shapes and sensor-like noise, as uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([np.sin(6 * x + 1), np.cos(4 * y), np.sin(3 * x * y + 2)], -1) * 90 + 128
    for _ in range(5):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def hf_processor():
    # Gemma 3n's preprocessor_config.json; the torchvision backend is what transformers picks
    # for it when torchvision is installed.
    return SiglipImageProcessor(do_convert_rgb=True, do_normalize=False, do_rescale=True,
                                do_resize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                resample=2, rescale_factor=1 / 255,
                                size={"height": 768, "width": 768})


# Preprocessing is exact up to float32 rounding of the final rescale (both sides multiply the same
# uint8 values by float32(1/255)); 1e-5 is 1/400 of one grey level.
PIXEL_TOL = 1e-5


@pytest.mark.parametrize("height,width", [(683, 1024), (1500, 1100), (480, 500), (768, 768)])
def test_preprocess_matches_processor(height, width, hf_processor):
    image = Image.fromarray(_photo(height, width, seed=height))
    theirs = hf_processor(images=image, return_tensors="np")["pixel_values"][0]
    ours = preprocess_image(image)
    assert ours.shape == (768, 768, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs.transpose(1, 2, 0), rtol=0, atol=PIXEL_TOL)


def test_preprocess_transparency_and_files(tmp_path, hf_processor):
    rgba = np.concatenate([_photo(300, 400, 7), np.random.default_rng(8).integers(
        0, 256, (300, 400, 1), dtype=np.uint8)], axis=-1)
    path = tmp_path / "photo.png"
    Image.fromarray(rgba, "RGBA").save(path)
    grey = _photo(200, 100, 9)[..., 0]
    ours = preprocess_images([path, grey])
    for index, image in enumerate([Image.open(path), Image.fromarray(grey, "L")]):
        theirs = hf_processor(images=image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours[index], theirs.transpose(1, 2, 0), rtol=0, atol=PIXEL_TOL)


def test_preprocess_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8 array"):
        preprocess_images([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(FileNotFoundError, match="not found"):
        preprocess_images([tmp_path / "missing.png"])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image file"):
        preprocess_images([tmp_path / "text.png"])
