"""Tests of the SigLIP vision encoder (issue 4): parameter tree, transformers parity, preprocessing,
the HF mapping, and input validation.

Numerics run on a tiny config (width 32, depth 2, 4 heads, MLP 64, 14x14 patches, 112x112 images
-> 8x8 = 64 patches pooled 4x4 -> 2x2 = 4 soft tokens); the full E4B size only through
`jax.eval_shape` and shape tables.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from PIL import Image

import hf_siglip
from gemma3n.embedder import Embedder
from gemma3n.vision import (SigLiPFromPatches, ViTModel, VisionExit, load_image,
                            normalize_images, preprocess_images, resize_images)
from reference import E4B_PARAMS_JSON

PARAMS_JSON = E4B_PARAMS_JSON

PATCH = 14
SMALL_SIDE = 112                       # 8 x 8 patches of 14 x 14
SMALL_PATCHES = (SMALL_SIDE // PATCH) ** 2
SMALL_TOKENS = 4                       # 2 x 2 grid after 4 x 4 average pooling
WIDTH, DEPTH, HEADS, MLP = 32, 2, 4, 64
TEXT_DIM = 48
LAYER_NORM_EPS = 1e-6
# Random weights: every leaf gets N(0, NOISE^2) added to its init (biases and LayerNorm scales
# become non-trivial, so a wrong bias or scale mapping shows up).
NOISE = 0.1
# float32 agreement bound with transformers. Both sides compute the same function in float32;
# they differ only in summation order (patch matmul vs conv, fused vs eager attention, pooling),
# so each op adds a few ulp (~1e-7 relative) on activations of order 1-10 through two blocks and
# three LayerNorms: measured max differences are ~4e-6 on values up to ~4. 1e-4 leaves margin for
# BLAS differences while any modelling error (GELU variant ~1e-3, LayerNorm eps, a dropped bias or
# transposed weight ~1e-1 or more) is far larger.
TOL = 1e-4


def small_model(name: str | None = None, **vit_overrides) -> SigLiPFromPatches:
    vit = dict(patch_size=(PATCH, PATCH), width=WIDTH, depth=DEPTH, mlp_dim=MLP, num_heads=HEADS)
    vit.update(vit_overrides)
    return SigLiPFromPatches(
        siglip_encoder=ViTModel(**vit), siglip_exit=VisionExit(output_length=SMALL_TOKENS),
        num_mm_tokens_per_image_prepool=SMALL_PATCHES, num_mm_tokens_per_image=SMALL_TOKENS,
        image_height=SMALL_SIDE, image_width=SMALL_SIDE, name=name)


def random_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def perturb(tree, seed: int):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [leaf + NOISE * jax.random.normal(key, leaf.shape, leaf.dtype)
             for leaf, key in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def small():
    """(model, random params, random [W] norm scale, random [W, TEXT_DIM] projection)."""
    model = small_model()
    params = model.init(jax.random.key(0), random_images((1, 1, SMALL_SIDE, SMALL_SIDE, 3)))
    params = perturb(params["params"], seed=1)
    rng = np.random.default_rng(2)
    mm_params = {
        "mm_soft_embedding_norm": {
            "scale": (NOISE * rng.standard_normal(WIDTH)).astype(np.float32)},
        "mm_input_projection": {
            "w": (rng.standard_normal((WIDTH, TEXT_DIM)) / np.sqrt(WIDTH)).astype(np.float32)},
    }
    return model, params, mm_params


def hf_siglip_config(**overrides) -> transformers.SiglipVisionConfig:
    fields = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH,
                  num_attention_heads=HEADS, num_channels=3, image_size=SMALL_SIDE,
                  patch_size=PATCH, hidden_act="gelu_pytorch_tanh",
                  layer_norm_eps=LAYER_NORM_EPS, vision_use_head=False)
    fields.update(overrides)
    return transformers.SiglipVisionConfig(**fields)


def hf_modules(params, mm_params):
    """HF SiglipVisionModel + Gemma3MultiModalProjector loaded (strictly) with our weights."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    # transformers 5.24's SiglipVisionModel keeps its tower at the top level: no key prefix.
    state = {k: torch.from_numpy(v)
             for k, v in hf_siglip.vision_to_hf(params, mm_params, vision_prefix="").items()}
    projector_keys = {hf_siglip.HF_MM_NORM, hf_siglip.HF_MM_PROJECTION}
    vision_config = hf_siglip_config()
    vision = transformers.SiglipVisionModel(vision_config).eval()
    vision.load_state_dict({k: v for k, v in state.items() if k not in projector_keys}, strict=True)
    config = transformers.Gemma3Config(
        vision_config=vision_config.to_dict(),
        text_config=transformers.Gemma3TextConfig(hidden_size=TEXT_DIM).to_dict(),
        mm_tokens_per_image=SMALL_TOKENS)
    projector = Gemma3MultiModalProjector(config).eval()
    projector.load_state_dict({k: state[k] for k in projector_keys}, strict=True)
    return vision, projector


def numpy_projection(soft_tokens: np.ndarray, mm_params) -> np.ndarray:
    """Reference norm + projection: RMSNorm (eps 1e-6) times (1 + scale), then x @ W."""
    x = soft_tokens.astype(np.float64)
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + LAYER_NORM_EPS)
    normed = normed * (1 + mm_params["mm_soft_embedding_norm"]["scale"])
    return normed @ mm_params["mm_input_projection"]["w"]


# --- (1) parameter tree -------------------------------------------------------------------------

def test_full_size_param_tree_matches_reference():
    model = SigLiPFromPatches()
    images = jax.ShapeDtypeStruct((1, 1, 896, 896, 3), jnp.uint8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    ours = {"vision_encoder/" + "/".join(path):
                {"shape": list(leaf.shape), "dtype": str(leaf.dtype)}
            for path, leaf in traverse_util.flatten_dict(shapes).items()}
    reference = {path: entry for path, entry in json.loads(PARAMS_JSON.read_text()).items()
                 if path.startswith("vision_encoder/")}
    assert len(reference) == 437
    assert ours == reference


def test_nested_in_a_parent_keeps_the_checkpoint_path():
    import flax.linen as nn

    class CompactParent(nn.Module):
        @nn.compact
        def __call__(self, images):
            # The ViTModel is created inside the parent's method, as a decoder would.
            return small_model(name="vision_encoder")(images)

    class SetupParent(nn.Module):
        def setup(self):
            self.vision_encoder = small_model()

        def __call__(self, images):
            return self.vision_encoder(images)

    images = jax.ShapeDtypeStruct((1, 1, SMALL_SIDE, SMALL_SIDE, 3), jnp.uint8)
    expected = jax.eval_shape(small_model().init, jax.random.key(0), images)["params"]
    for parent in (CompactParent(), SetupParent()):
        params = jax.eval_shape(parent.init, jax.random.key(0), images)["params"]
        assert jax.tree.map(jnp.shape, params) == {
            "vision_encoder": jax.tree.map(jnp.shape, expected)}


def test_full_size_output_shape():
    model = SigLiPFromPatches()
    images = jax.ShapeDtypeStruct((2, 3, 480, 640, 3), jnp.uint8)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
    assert out.shape == (2, 3, 256, 1152) and out.dtype == jnp.float32


def test_hf_mapping_table_matches_full_size_siglip():
    dims = hf_siglip.SiglipDims(width=1152, num_heads=16, head_dim=72, mlp_dim=4304,
                                patch_size=(14, 14), channels=3, num_patches=4096, depth=27)
    config = hf_siglip_config(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                              num_attention_heads=16, image_size=896)
    with torch.device("meta"):
        hf_shapes = {k: tuple(v.shape)
                     for k, v in transformers.SiglipVisionModel(config).state_dict().items()}
    reference = json.loads(PARAMS_JSON.read_text())
    ours = {e.hf: e.conversion.hf_shape(e.shape(dims)) for e in hf_siglip.vision_entries(27)}
    assert ours == hf_shapes
    for entry in hf_siglip.vision_entries(27):
        path = f"vision_encoder/siglip_encoder/{entry.ours}"
        assert list(entry.shape(dims)) == reference[path]["shape"]


# --- (2) parity with transformers ---------------------------------------------------------------

def test_matches_transformers_siglip_and_gemma3_projector(small):
    model, params, mm_params = small
    variables = {"params": params}
    images = random_images((2, 2, 150, 97, 3), seed=3)         # [B, N, H, W, C], resized inside
    pixels = model.apply(variables, images, method=SigLiPFromPatches.preprocess)
    patches = model.apply(variables, pixels, method=SigLiPFromPatches.patchify)
    features = model.apply(variables, patches, method=SigLiPFromPatches.encode_patches)
    soft_tokens = np.asarray(jax.jit(model.apply)(variables, images))
    assert soft_tokens.shape == (2, 2, SMALL_TOKENS, WIDTH)

    vision, projector = hf_modules(params, mm_params)
    hf_pixels = torch.from_numpy(np.array(pixels).reshape(4, SMALL_SIDE, SMALL_SIDE, 3))
    pooled_by_hf = []
    hook = projector.mm_soft_emb_norm.register_forward_hook(
        lambda module, inputs, output: pooled_by_hf.append(inputs[0]))
    with torch.no_grad():
        hf_features = vision(pixel_values=hf_pixels.permute(0, 3, 1, 2)).last_hidden_state
        hf_projected = projector(hf_features).numpy()
    hook.remove()

    features = np.asarray(features).reshape(4, SMALL_PATCHES, WIDTH)
    diff_features = np.abs(features - hf_features.numpy())
    diff_pooled = np.abs(soft_tokens.reshape(4, SMALL_TOKENS, WIDTH) - pooled_by_hf[0].numpy())
    ours_projected = numpy_projection(soft_tokens, mm_params).reshape(4, SMALL_TOKENS, TEXT_DIM)
    diff_projected = np.abs(ours_projected - hf_projected)
    assert np.abs(hf_features.numpy()).max() > 1.0             # not a degenerate comparison
    assert diff_features.max() < TOL, diff_features.max()
    assert diff_pooled.max() < TOL, diff_pooled.max()
    assert diff_projected.max() < TOL, diff_projected.max()


def test_embedder_encode_vision_matches_transformers_projector(small):
    model, params, mm_params = small
    soft_tokens = np.asarray(model.apply({"params": params}, random_images((1, 2, 60, 80, 3))))
    embedder = Embedder(vocab_size=8, embed_dim=TEXT_DIM, num_layers=1, per_layer_dim=4,
                        vision_dim=WIDTH)
    emb_params = embedder.init(jax.random.key(0), jnp.asarray(soft_tokens),
                               method=Embedder.encode_vision)["params"]
    emb_params = {**emb_params, **mm_params}
    ours = embedder.apply({"params": emb_params}, jnp.asarray(soft_tokens),
                          method=Embedder.encode_vision)

    _, projector = hf_modules(params, mm_params)
    with torch.no_grad():
        # The projector pools 8x8 -> 2x2; feeding each soft token repeated over its 4x4 window
        # makes that pooling the identity, so only norm + projection are compared here.
        grid = soft_tokens.reshape(2, 2, 1, 2, 1, WIDTH)
        spread = np.broadcast_to(grid, (2, 2, 4, 2, 4, WIDTH)).reshape(2, SMALL_PATCHES, WIDTH)
        hf_projected = projector(torch.from_numpy(np.ascontiguousarray(spread))).numpy()
    diff = np.abs(np.asarray(ours).reshape(2, SMALL_TOKENS, TEXT_DIM) - hf_projected)
    assert diff.max() < TOL, diff.max()


def test_scan_layout_computes_the_same(small):
    _, params, _ = small
    images = random_images((1, 1, SMALL_SIDE, SMALL_SIDE, 3), seed=4)
    scanned = small_model(scan=True)
    blocks = params["siglip_encoder"]["Transformer"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[blocks[f"encoderblock_{i}"] for i in range(DEPTH)])
    scan_params = jax.eval_shape(scanned.init, jax.random.key(0), images)["params"]
    assert jax.tree.map(jnp.shape, scan_params["siglip_encoder"]["Transformer"]["encoderblock"]) \
        == jax.tree.map(jnp.shape, stacked)
    encoder = {**params["siglip_encoder"],
               "Transformer": {"encoderblock": stacked, "encoder_norm": blocks["encoder_norm"]}}
    expected = small_model().apply({"params": params}, images)
    got = scanned.apply({"params": {"siglip_encoder": encoder}}, images)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_stop_gradient(small):
    _, params, _ = small
    images = random_images((1, 1, SMALL_SIDE, SMALL_SIDE, 3), seed=5)

    def grad_norm(model):
        grads = jax.grad(lambda p: model.apply({"params": p}, images).sum())(params)
        return sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads))

    assert grad_norm(small_model()) == 0.0
    assert grad_norm(small_model().clone(apply_stop_gradient=False)) > 0.0


def test_vision_exit_pools_windows():
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 16, 1)     # 4 x 4 grid of values 0..15
    pooled = VisionExit(output_length=4).apply({}, x)
    # Means of the 2x2 windows {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}.
    np.testing.assert_array_equal(pooled[0, :, 0], [2.5, 4.5, 10.5, 12.5])
    assert VisionExit(output_length=16).apply({}, x).shape == (1, 16, 1)


def test_patchify_layout(small):
    model, params, _ = small
    pixels = jnp.asarray(np.random.default_rng(6).random((1, 1, SMALL_SIDE, SMALL_SIDE, 3)),
                         jnp.float32)
    patches = model.apply({"params": params}, pixels, method=SigLiPFromPatches.patchify)
    grid_side = SMALL_SIDE // PATCH
    assert patches.shape == (1, 1, SMALL_PATCHES, PATCH * PATCH * 3)
    row, col = 2, 5
    window = pixels[0, 0, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH]
    np.testing.assert_array_equal(patches[0, 0, row * grid_side + col], window.reshape(-1))


# --- (3) preprocessing --------------------------------------------------------------------------

def test_preprocess_constant_and_range():
    for value, expected in ((0, -1.0), (255, 1.0), (51, -0.6)):   # (51 - 127.5) / 127.5 = -0.6
        image = np.full((300, 200, 3), value, np.uint8)
        out = preprocess_images(image)
        assert out.shape == (896, 896, 3) and out.dtype == jnp.float32
        np.testing.assert_allclose(out, expected, atol=1e-6)
    out = preprocess_images(random_images((2, 123, 457, 3)))
    assert out.shape == (2, 896, 896, 3)
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(normalize_images(jnp.array([-10.0, 300.0])), [-1.0, 1.0])
    # Any floating dtype is accepted, bfloat16 included (numpy does not count it as floating).
    np.testing.assert_allclose(preprocess_images(jnp.full((5, 5, 3), 255, jnp.bfloat16)), 1.0,
                               atol=1e-6)


def test_preprocess_two_colour_upsample():
    # Columns 0 | 255 upsampled 2 -> 896 (factor 448): output column x samples input coordinate
    # u = (x + 0.5) / 448 - 0.5; bilinear gives 255 * clip(u, 0, 1), i.e. 2 * clip(u, 0, 1) - 1.
    image = np.zeros((2, 2, 3), np.uint8)
    image[:, 1] = 255
    out = np.asarray(preprocess_images(image))
    u = np.clip((np.arange(896) + 0.5) / 448 - 0.5, 0.0, 1.0)
    np.testing.assert_allclose(out, np.broadcast_to((2 * u - 1)[None, :, None], out.shape),
                               atol=1e-5)


def test_preprocess_antialiased_downsample():
    # Columns repeat 0, 0, 255, 255 over width 1792 -> 896 (factor 2). Antialiasing widens the
    # triangle kernel to 4 input pixels with weights 1/8, 3/8, 3/8, 1/8 on columns 2x-1..2x+2:
    # even x -> 255 * (1/8 + 1/8) = 63.75, odd x -> 255 * (3/8 + 3/8) = 191.25. At the borders
    # the outside column is dropped and the weights renormalised over 7/8: x = 0 -> 255 * (1/8)
    # / (7/8) = 255/7, x = 895 -> 255 * (6/8) / (7/8) = 255 * 6/7. Plain bilinear would give 0, 255.
    columns = np.tile(np.array([0, 0, 255, 255], np.uint8), 1792 // 4)
    image = np.broadcast_to(columns[None, :, None], (896, 1792, 3))
    row = np.asarray(resize_images(image))[0, :, 0]
    expected = np.where(np.arange(896) % 2 == 0, 63.75, 191.25)
    expected[0], expected[-1] = 255 / 7, 255 * 6 / 7
    np.testing.assert_allclose(row, expected, atol=1e-3)


def test_preprocess_float_input_and_exact_size():
    image = random_images((896, 896, 3), seed=7)
    from_uint8 = preprocess_images(image)
    np.testing.assert_array_equal(from_uint8, preprocess_images(image.astype(np.float32)))
    # Already at the target size: no resampling, only the affine map.
    np.testing.assert_allclose(from_uint8, (image.astype(np.float32) - 127.5) / 127.5, atol=1e-6)


# --- (4) bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("images, message", [
    (np.zeros((10, 10), np.uint8), "rank"),
    (np.zeros((10, 10, 4), np.uint8), "3 channels"),
    (np.zeros((10, 10, 3), np.int32), "dtype int32"),
    (np.zeros((10, 10, 3), bool), "dtype bool"),
    (np.zeros((0, 10, 3), np.uint8), "non-empty"),
])
def test_preprocess_rejects_bad_images(images, message):
    with pytest.raises(ValueError, match=message):
        preprocess_images(images)


def test_model_rejects_bad_images_and_config(small):
    model, params, _ = small
    with pytest.raises(ValueError, match="num_images"):
        model.apply({"params": params}, random_images((1, 20, 20, 3)))     # missing N axis
    with pytest.raises(ValueError, match="channels"):
        model.apply({"params": params}, np.zeros((1, 1, 20, 20, 1), np.uint8))
    with pytest.raises(ValueError, match="patchify expects"):
        model.apply({"params": params}, jnp.zeros((1, 1, 50, 50, 3)),
                    method=SigLiPFromPatches.patchify)
    with pytest.raises(ValueError, match="num_mm_tokens_per_image_prepool"):
        SigLiPFromPatches(num_mm_tokens_per_image_prepool=1024)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        SigLiPFromPatches(image_height=900)
    with pytest.raises(ValueError, match=r"siglip_exit.output_length \(16\) must equal "
                                         r"num_mm_tokens_per_image \(256\)"):
        SigLiPFromPatches(siglip_exit=VisionExit(output_length=16))
    with pytest.raises(ValueError, match="perfect square"):
        VisionExit(output_length=5).apply({}, jnp.zeros((1, 16, 2)))
    with pytest.raises(ValueError, match="not a multiple"):
        VisionExit(output_length=9).apply({}, jnp.zeros((1, 16, 2)))
    with pytest.raises(ValueError, match="remat_policy"):
        small_model(remat_policy="no_such_policy").init(
            jax.random.key(0), random_images((1, 1, SMALL_SIDE, SMALL_SIDE, 3)))


# --- (5) load_image -----------------------------------------------------------------------------

def test_load_image(tmp_path):
    rgb = random_images((7, 5, 3), seed=8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    loaded = load_image(tmp_path / "rgb.png")
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, rgb)

    grey = random_images((4, 6), seed=9)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "grey.png")),
                                  np.repeat(grey[..., None], 3, axis=-1))


def test_load_image_errors(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(broken)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


# --- HF mapping ---------------------------------------------------------------------------------

def _bits(tree) -> dict:
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))
    return {k: (v.dtype, v.shape, v.tobytes()) for k, v in flat.items()}


def test_hf_mapping_round_trips_bit_exactly(small):
    _, params, mm_params = small
    state = hf_siglip.vision_to_hf(params, mm_params)
    assert len(state) == 3 + 16 * DEPTH + 2 + 2
    assert all(k.startswith("vision_model.") for k in state if not k.startswith("mm_"))
    vision, mm = hf_siglip.vision_from_hf(state, num_heads=HEADS)
    assert _bits(vision) == _bits(params)
    assert _bits(mm) == _bits(mm_params)
    # HF -> ours -> HF, with prefixes and unrelated keys of a larger checkpoint around.
    prefixes = dict(vision_prefix="vision_tower.vision_model.",
                    projector_prefix="multi_modal_projector.")
    prefixed = {prefixes["vision_prefix"] + k.removeprefix("vision_model.")
                if k.startswith("vision_model.") else prefixes["projector_prefix"] + k: v
                for k, v in state.items()}
    prefixed["language_model.model.embed_tokens.weight"] = np.zeros((3, 4), np.float32)
    vision, mm = hf_siglip.vision_from_hf(prefixed, num_heads=HEADS, **prefixes)
    again = hf_siglip.vision_to_hf(vision, mm, **prefixes)
    assert set(again) == set(prefixed) - {"language_model.model.embed_tokens.weight"}
    assert all(again[k].tobytes() == prefixed[k].tobytes() for k in again)
    vision_only, no_mm = hf_siglip.vision_from_hf(
        {k: v for k, v in state.items() if k.startswith("vision_model.")}, num_heads=HEADS)
    assert no_mm is None and _bits(vision_only) == _bits(params)


def test_hf_mapping_errors(small):
    _, params, mm_params = small
    state = hf_siglip.vision_to_hf(params, mm_params)
    q_key = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="q_proj.weight: expected shape"):
        hf_siglip.vision_from_hf({**state, q_key: np.zeros((WIDTH, WIDTH + 1), np.float32)},
                                 num_heads=HEADS)
    with pytest.raises(ValueError, match="missing parameter.*k_proj.bias"):
        hf_siglip.vision_from_hf(
            {k: v for k, v in state.items() if not k.endswith("layers.0.self_attn.k_proj.bias")},
            num_heads=HEADS)
    with pytest.raises(ValueError, match="vision_use_head"):
        hf_siglip.vision_from_hf({**state, "vision_model.head.probe": np.zeros((1, 1, WIDTH))},
                                 num_heads=HEADS)
    with pytest.raises(ValueError, match="num_heads"):
        hf_siglip.vision_from_hf(state, num_heads=5)
    with pytest.raises(ValueError, match="without its partner"):
        hf_siglip.vision_from_hf({k: v for k, v in state.items() if k != "mm_soft_emb_norm.weight"},
                                 num_heads=HEADS)
    bad = jax.tree.map(np.asarray, params)
    bad["siglip_encoder"]["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_1"]["bias"] = \
        np.zeros(WIDTH + 1, np.float32)
    with pytest.raises(ValueError, match="Dense_1/bias: expected shape"):
        hf_siglip.vision_to_hf(bad)
    bad_mm = {**mm_params, "mm_input_projection": {"w": np.zeros((WIDTH + 1, 3), np.float32)}}
    with pytest.raises(ValueError, match="mm_input_projection/w"):
        hf_siglip.vision_to_hf(params, bad_mm)
