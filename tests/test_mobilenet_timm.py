"""Tests of the MobileNet-V5 vision tower (issue 16) against timm: per block and end to end, the
image features, and the real architecture's names and shapes. The rest of the tower's tests
(mapping, loading, embedder, preprocessing) are in test_mobilenet.py and need no timm.

The oracle is timm's `mobilenetv5_300m_enc` built through transformers' `TimmWrapperModel` from a
`Gemma3nVisionConfig` whose `model_args` replace the block list by the small one of
test_mobilenet.py. timm fixes the adapter's output at 2048 channels, so the small tower keeps
that width. Images of 64 x 64 go through the average-pooling adapter path; 80 x 80 images give
odd feature sizes (asymmetric 'SAME' padding, 3 -> 5 nearest upsampling) and the bilinear path.

timm imports torchvision, whose PyPI wheels for our pinned CPU torch do not load beside it: timm
is imported with an import-only stand-in for torchvision (torchvision_standin.py), which the
tower never calls.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import numpy as np
import pytest
import torch

from torchvision_standin import import_timm, timm_in_transformers

timm = import_timm()
from timm.models._efficientnet_builder import decode_arch_def  # noqa: E402 (after timm's import)
from transformers import AutoModel, Gemma3nVisionConfig
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nModel

from gemma3n.checkpoints import hf_mobilenet
from gemma3n.multimodal_embedder import MultimodalEmbedder
from gemma3n.vision.mobilenet import config as mnv5
from gemma3n.vision.mobilenet.attention import MultiQueryAttentionBlock
from gemma3n.vision.mobilenet.blocks import EdgeResidualBlock, InvertedBottleneckBlock
from gemma3n.vision.mobilenet.encoder import MobileNetV5
from gemma3n.vision.mobilenet.msfa import MultiScaleFusionAdapter
from test_mobilenet import (BATCH, HIDDEN, SMALL, SMALL_ARCH, TEXT_WIDTH,  # noqa: F401 (fixtures)
                            embed_state, hf_embedder, hf_layout, randomise)

SMALL_ODD = dataclasses.replace(SMALL, image_size=80)
# float32 bound against torch. Both compute the same function in float32 and differ only in
# summation order (XLA vs oneDNN convolutions, fused vs eager attention): measured max
# differences are ~1e-6 on blocks and ~5e-6 on the tower's final-norm outputs (|x| up to ~5),
# 1e-4 leaves margin. A modelling error (GELU variant ~1e-3, eps, padding side, a wrong
# transpose, nearest vs bilinear) is far larger.
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_tower():
    config = Gemma3nVisionConfig(model_args=dict(
        block_args=decode_arch_def(SMALL_ARCH), stem_size=SMALL.stem_channels,
        msfa_output_resolution=SMALL.msfa_resolution))
    with timm_in_transformers():
        tower = AutoModel.from_config(config).eval()
    randomise(tower, seed=0)
    return tower


@pytest.fixture(scope="module")
def params(hf_tower):
    state = {f"model.vision_tower.{k}": v.numpy() for k, v in hf_tower.state_dict().items()}
    return hf_mobilenet.vision_tower_from_hf(state, SMALL)


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


def test_image_features_match_get_image_features(hf_tower, hf_embedder, embed_state, run_tower):
    """Tower + embedder against transformers' own `get_image_features` on the same modules."""
    embedder_params = hf_mobilenet.embed_vision_from_hf(embed_state, SMALL, TEXT_WIDTH)
    pixels = _pixels(SMALL.image_size, seed=4)
    tokens = run_tower(SMALL, pixels)
    ours = np.asarray(hf_mobilenet.vision_embedder(SMALL, TEXT_WIDTH).apply(
        {"params": embedder_params}, tokens, method=MultimodalEmbedder.embed_soft))
    model = types.SimpleNamespace(
        vision_tower=hf_tower, embed_vision=hf_embedder,
        config=types.SimpleNamespace(vision_config=hf_tower.config, return_dict=True,
                                     vision_soft_tokens_per_image=SMALL.num_soft_tokens))
    with torch.no_grad():
        theirs = Gemma3nModel.get_image_features(model, _nchw(pixels)).pooler_output.numpy()
    assert ours.shape == theirs.shape == (BATCH, SMALL.num_soft_tokens, TEXT_WIDTH)
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
        assert hf_layout(shape) == theirs[name], name
    assert mnv5.MOBILENET_V5_300M.num_soft_tokens == 256
