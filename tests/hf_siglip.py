"""Test helper (oracle mapping): our SigLIP vision parameters <-> Hugging Face `SiglipVisionModel`
+ `Gemma3MultiModalProjector` (average pool 4x4, RMS norm with 1 + scale, projection), in both
directions, in plain numpy.

Not a test module, and not part of the package: the released Gemma 3n checkpoints carry a
MobileNet-V5 tower, not SigLIP, so nothing loads HF SigLIP weights into our model; the vision
tests use this mapping to run `transformers`' SigLIP on our weights as their numerical oracle.

Our side: the `SigLiPFromPatches` parameter tree (the model's `params['vision_encoder']`, holding
`siglip_encoder/...`, unrolled `scan=False` layout) and the two multimodal parameters of the
embedder (`mm_soft_embedding_norm/scale` [W], `mm_input_projection/w` [W, D]).
HF side: a flat state dict. The vision tower's keys (`embeddings.*`, `encoder.layers.{i}.*`,
`post_layernorm.*`) sit under `vision_prefix`, default `vision_model.` as in SigLIP checkpoint
files; the projector's (`mm_soft_emb_norm.weight`, `mm_input_projection_weight`) under
`projector_prefix`. Prefixes in use:
- `SiglipVisionModel(...).state_dict()` of transformers >= 5.24: `vision_prefix=""` (the module
  no longer nests a `vision_model`); `Gemma3MultiModalProjector.state_dict()`: no prefix.
- Gemma 3 checkpoint files: `vision_tower.vision_model.` and `multi_modal_projector.`.
- `Gemma3ForConditionalGeneration(...).state_dict()` (5.24): `model.vision_tower.` and
  `model.multi_modal_projector.`.

Every conversion is a transpose and/or reshape, so a round trip is bit-exact.

Example:
    >>> state = vision_to_hf(params['vision_encoder'], params['embedder'])
    >>> vision_params, mm_params = vision_from_hf(state, num_heads=16)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from gemma3n.checkpoints.hf_mapping import flatten_params, unflatten_params
from gemma3n.validation import check_finite

ENCODER = "siglip_encoder"
HF_VISION_PREFIX = "vision_model."
HF_LAYER = "encoder.layers."
# Top-level names of the HF vision tower: keys under the prefix starting with one of these belong to
# it (`head.` only exists with vision_use_head=True, which this model does not have).
HF_VISION_ROOTS = ("embeddings.", "encoder.", "post_layernorm.", "head.")
BLOCK = "Transformer/encoderblock_"
# Our embedder's multimodal projection parameters and their HF projector keys.
MM_NORM = "mm_soft_embedding_norm/scale"
MM_PROJECTION = "mm_input_projection/w"
HF_MM_NORM = "mm_soft_emb_norm.weight"
HF_MM_PROJECTION = "mm_input_projection_weight"

Shape = tuple[int, ...]


class _Conversion(NamedTuple):
    """How one parameter changes layout: HF shape from ours, and the array maps both ways."""
    hf_shape: Callable[[Shape], Shape]
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray, Shape], np.ndarray]   # (hf array, our shape) -> ours


_IDENTITY = _Conversion(lambda s: s, lambda x: x, lambda x, s: x)
# Our Dense kernel is [in, out]; torch Linear weight is [out, in].
_DENSE = _Conversion(lambda s: s[::-1], lambda x: x.T, lambda x, s: x.T)
# Patch embedding: ours [ph, pw, C, W] (conv HWIO), torch Conv2d weight [W, C, ph, pw].
_CONV = _Conversion(lambda s: (s[3], s[2], s[0], s[1]),
                    lambda x: x.transpose(3, 2, 0, 1), lambda x, s: x.transpose(2, 3, 1, 0))
# Position embedding: ours [1, L, W], HF embedding table [L, W].
_POSEMB = _Conversion(lambda s: s[1:], lambda x: x[0], lambda x, s: x[None])
# q/k/v projections: ours [W, heads, head_dim], HF Linear [heads * head_dim, W].
_HEADS_IN = _Conversion(lambda s: (s[1] * s[2], s[0]),
                        lambda x: x.reshape(x.shape[0], -1).T, lambda x, s: x.T.reshape(s))
# q/k/v biases: ours [heads, head_dim], HF [heads * head_dim].
_HEADS_BIAS = _Conversion(lambda s: (s[0] * s[1],), lambda x: x.reshape(-1),
                          lambda x, s: x.reshape(s))
# Output projection: ours [heads, head_dim, W], HF Linear [W, heads * head_dim].
_HEADS_OUT = _Conversion(lambda s: (s[2], s[0] * s[1]),
                         lambda x: x.reshape(-1, x.shape[-1]).T, lambda x, s: x.T.reshape(s))


@dataclasses.dataclass(frozen=True)
class SiglipDims:
    """Sizes that fix every parameter shape of the vision tower.

    Example:
        >>> dims = SiglipDims(width=1152, num_heads=16, head_dim=72, mlp_dim=4304,
        ...                   patch_size=(14, 14), channels=3, num_patches=4096, depth=27)
    """
    width: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    patch_size: tuple[int, int]
    channels: int
    num_patches: int
    depth: int


class VisionEntry(NamedTuple):
    """One row of the mapping table (doc section 4): our path, HF key, layout change, our shape.

    Example:
        >>> entry = vision_entries(depth=27)[0]          # the patch embedding kernel
        >>> entry.conversion.hf_shape(entry.shape(dims))  # (1152, 3, 14, 14)
    """
    ours: str                              # path below `siglip_encoder/`
    hf: str                                # key below the HF vision prefix
    conversion: _Conversion
    shape: Callable[[SiglipDims], Shape]   # our shape


def _width(dims: SiglipDims) -> Shape:
    return (dims.width,)


def _attention_entries(i: int) -> list[VisionEntry]:
    ours = f"{BLOCK}{i}/MultiHeadDotProductAttention_0/"
    hf = f"{HF_LAYER}{i}.self_attn."
    entries = []
    for our_name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        entries += [
            VisionEntry(f"{ours}{our_name}/kernel", f"{hf}{hf_name}.weight", _HEADS_IN,
                        lambda d: (d.width, d.num_heads, d.head_dim)),
            VisionEntry(f"{ours}{our_name}/bias", f"{hf}{hf_name}.bias", _HEADS_BIAS,
                        lambda d: (d.num_heads, d.head_dim)),
        ]
    return entries + [
        VisionEntry(f"{ours}out/kernel", f"{hf}out_proj.weight", _HEADS_OUT,
                    lambda d: (d.num_heads, d.head_dim, d.width)),
        VisionEntry(f"{ours}out/bias", f"{hf}out_proj.bias", _IDENTITY, _width),
    ]


def _block_entries(i: int) -> list[VisionEntry]:
    ours, hf = f"{BLOCK}{i}/", f"{HF_LAYER}{i}."
    entries = []
    for our_norm, hf_norm in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        entries += [
            VisionEntry(f"{ours}{our_norm}/scale", f"{hf}{hf_norm}.weight", _IDENTITY, _width),
            VisionEntry(f"{ours}{our_norm}/bias", f"{hf}{hf_norm}.bias", _IDENTITY, _width),
        ]
    mlp = f"{ours}MlpBlock_0/"
    return entries + _attention_entries(i) + [
        VisionEntry(f"{mlp}Dense_0/kernel", f"{hf}mlp.fc1.weight", _DENSE,
                    lambda d: (d.width, d.mlp_dim)),
        VisionEntry(f"{mlp}Dense_0/bias", f"{hf}mlp.fc1.bias", _IDENTITY, lambda d: (d.mlp_dim,)),
        VisionEntry(f"{mlp}Dense_1/kernel", f"{hf}mlp.fc2.weight", _DENSE,
                    lambda d: (d.mlp_dim, d.width)),
        VisionEntry(f"{mlp}Dense_1/bias", f"{hf}mlp.fc2.bias", _IDENTITY, _width),
    ]


def vision_entries(depth: int) -> list[VisionEntry]:
    """The mapping table of a `depth`-block vision tower (paths below `siglip_encoder/`)."""
    entries = [
        VisionEntry("embedding/kernel", "embeddings.patch_embedding.weight", _CONV,
                    lambda d: (*d.patch_size, d.channels, d.width)),
        VisionEntry("embedding/bias", "embeddings.patch_embedding.bias", _IDENTITY, _width),
        VisionEntry("pos_embedding", "embeddings.position_embedding.weight", _POSEMB,
                    lambda d: (1, d.num_patches, d.width)),
    ]
    for i in range(depth):
        entries += _block_entries(i)
    return entries + [
        VisionEntry("Transformer/encoder_norm/scale", "post_layernorm.weight", _IDENTITY, _width),
        VisionEntry("Transformer/encoder_norm/bias", "post_layernorm.bias", _IDENTITY, _width),
    ]


def _check_shape(name: str, array: np.ndarray, expected: Shape) -> None:
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(array.shape)}")


def _check_mm_shapes(norm: np.ndarray, projection: np.ndarray, width: int,
                     norm_name: str, projection_name: str) -> None:
    _check_shape(norm_name, norm, (width,))
    if projection.ndim != 2 or projection.shape[0] != width:
        raise ValueError(f"{projection_name}: expected shape ({width}, text_dim), "
                         f"got {tuple(projection.shape)}")


def _require(flat: Mapping[str, Any], key: str, where: str) -> np.ndarray:
    if key not in flat:
        raise ValueError(f"missing parameter {key!r} in {where}")
    return np.asarray(flat[key])


def _depth_from(names: list[str], block_prefix: str, where: str) -> int:
    pattern = re.compile(re.escape(block_prefix) + r"(\d+)[./]")
    indices = {int(match.group(1)) for match in map(pattern.match, names) if match}
    if indices != set(range(len(indices))):
        raise ValueError(f"{where}: encoder layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _our_dims(encoder: Mapping[str, Any]) -> SiglipDims:
    where = "our vision parameters"
    kernel = _require(encoder, "embedding/kernel", where)
    query = _require(encoder, f"{BLOCK}0/MultiHeadDotProductAttention_0/query/kernel", where)
    mlp_bias = _require(encoder, f"{BLOCK}0/MlpBlock_0/Dense_0/bias", where)
    pos = _require(encoder, "pos_embedding", where)
    if kernel.ndim != 4 or query.ndim != 3 or mlp_bias.ndim != 1 or pos.ndim != 3:
        raise ValueError(
            f"{where}: unexpected ranks: embedding/kernel {kernel.shape}, query kernel "
            f"{query.shape}, Dense_0 bias {mlp_bias.shape}, pos_embedding {pos.shape}")
    return SiglipDims(width=kernel.shape[3], num_heads=query.shape[1], head_dim=query.shape[2],
                      mlp_dim=mlp_bias.shape[0], patch_size=(kernel.shape[0], kernel.shape[1]),
                      channels=kernel.shape[2], num_patches=pos.shape[1],
                      depth=_depth_from(list(encoder), BLOCK, where))


def _hf_dims(state: Mapping[str, Any], num_heads: int, where: str) -> SiglipDims:
    patch = _require(state, "embeddings.patch_embedding.weight", where)
    pos = _require(state, "embeddings.position_embedding.weight", where)
    fc1 = _require(state, f"{HF_LAYER}0.mlp.fc1.bias", where)
    if patch.ndim != 4 or pos.ndim != 2 or fc1.ndim != 1:
        raise ValueError(
            f"{where}: unexpected ranks: patch_embedding.weight {patch.shape}, "
            f"position_embedding.weight {pos.shape}, fc1.bias {fc1.shape}")
    width = patch.shape[0]
    if num_heads <= 0 or width % num_heads:
        raise ValueError(f"num_heads ({num_heads}) must divide the width ({width})")
    return SiglipDims(width=width, num_heads=num_heads, head_dim=width // num_heads,
                      mlp_dim=fc1.shape[0], patch_size=(patch.shape[2], patch.shape[3]),
                      channels=patch.shape[1], num_patches=pos.shape[0],
                      depth=_depth_from(list(state), HF_LAYER, where))


def vision_to_hf(
        vision_params: Mapping[str, Any],
        embedder_params: Mapping[str, Any] | None = None,
        *,
        vision_prefix: str = HF_VISION_PREFIX,
        projector_prefix: str = "",
) -> dict[str, np.ndarray]:
    """Our `vision_encoder` tree (+ optionally the embedder's mm params) -> flat HF state dict.

    `embedder_params` may be the whole embedder tree: only its two `mm_*` entries are used.
    Raises ValueError on missing, unexpected or wrongly shaped parameters.
    """
    if ENCODER not in vision_params:
        raise ValueError(
            f"vision parameters must hold {ENCODER!r}; got keys {sorted(vision_params)}")
    encoder = flatten_params(vision_params[ENCODER])
    dims = _our_dims(encoder)
    entries = vision_entries(dims.depth)
    unexpected = sorted(set(encoder) - {entry.ours for entry in entries})
    if unexpected:
        raise ValueError(f"unexpected vision parameters (scan=False layout expected): {unexpected}")
    state = {}
    for entry in entries:
        array = _require(encoder, entry.ours, "our vision parameters")
        _check_shape(f"{ENCODER}/{entry.ours}", array, entry.shape(dims))
        state[vision_prefix + entry.hf] = np.array(entry.conversion.to_hf(array), order="C")
    if embedder_params is not None:
        embedder = flatten_params(embedder_params)
        norm = _require(embedder, MM_NORM, "the embedder parameters")
        projection = _require(embedder, MM_PROJECTION, "the embedder parameters")
        _check_mm_shapes(norm, projection, dims.width,
                         f"embedder/{MM_NORM}", f"embedder/{MM_PROJECTION}")
        state[projector_prefix + HF_MM_NORM] = np.array(norm)
        state[projector_prefix + HF_MM_PROJECTION] = np.array(projection)
    return state


def vision_from_hf(
        state: Mapping[str, Any],
        *,
        num_heads: int,
        vision_prefix: str = HF_VISION_PREFIX,
        projector_prefix: str = "",
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Flat HF state dict -> (our `vision_encoder` tree, the embedder's mm params or None).

    `num_heads` is needed because HF stores attention projections with heads merged. Keys outside
    the vision tower (see `HF_VISION_ROOTS`) and the projector are ignored, so a full checkpoint
    may be given; inside the tower every key must be known. The second value is None when the
    checkpoint has no projector. Raises ValueError on missing, unexpected or misshaped entries,
    and on values that are NaN or Inf.
    """
    vision = {key[len(vision_prefix):]: value for key, value in state.items()
              if key.startswith(vision_prefix)
              and key[len(vision_prefix):].startswith(HF_VISION_ROOTS)}
    where = f"the HF state dict (vision_prefix {vision_prefix!r})"
    dims = _hf_dims(vision, num_heads, where)
    entries = vision_entries(dims.depth)
    unexpected = sorted(set(vision) - {entry.hf for entry in entries})
    if unexpected:
        raise ValueError(
            f"unexpected HF vision keys (a SiglipVisionModel with vision_use_head=False is "
            f"expected): {[vision_prefix + key for key in unexpected]}")
    encoder = {}
    for entry in entries:
        array = _require(vision, entry.hf, where)
        our_shape = entry.shape(dims)
        _check_shape(vision_prefix + entry.hf, array, entry.conversion.hf_shape(our_shape))
        encoder[entry.ours] = np.array(entry.conversion.from_hf(array, our_shape), order="C")
        check_finite(f"HF vision tensor {vision_prefix + entry.hf}", encoder[entry.ours])
    vision_params = {ENCODER: unflatten_params(encoder)}

    norm_key, projection_key = projector_prefix + HF_MM_NORM, projector_prefix + HF_MM_PROJECTION
    present = [key for key in (norm_key, projection_key) if key in state]
    if not present:
        return vision_params, None
    if len(present) == 1:
        raise ValueError(f"the HF state dict holds {present[0]!r} without its partner "
                         f"({norm_key!r} and {projection_key!r} go together)")
    norm, projection = np.asarray(state[norm_key]), np.asarray(state[projection_key])
    _check_mm_shapes(norm, projection, dims.width, norm_key, projection_key)
    check_finite(f"HF tensor {norm_key}", norm)
    check_finite(f"HF tensor {projection_key}", projection)
    mm_params = unflatten_params({MM_NORM: np.array(norm), MM_PROJECTION: np.array(projection)})
    return vision_params, mm_params
