"""Hugging Face names of the MobileNet-V5 vision tower and the vision embedder, and their loading.

Our trees are the source of truth: every leaf our modules declare (shapes from `jax.eval_shape`,
no weights computed) gets exactly one HF tensor, named by a rule and converted by its kind:

| ours (leaf)                         | HF (under the prefix)               | conversion              |
|-------------------------------------|-------------------------------------|-------------------------|
| `blocks_{s}_{b}/...`                | `blocks.{s}.{b}....`                | (path only)             |
| `.../kernel` [kh, kw, in, out]      | `....weight` [out, in, kh, kw]      | transpose (3, 2, 0, 1)  |
| `.../scale` [C] (RMS norms)         | `....weight` [C]                    | none                    |
| `.../bias`, `.../gamma` [C]         | same name                           | none                    |
| `embedding` [V, W]                  | `embedding.weight` [V, W]           | none                    |
| `embedding_projection/w` [D, W]     | `embedding_projection.weight` [D, W]| none                    |

Prefixes in a `Gemma3nForConditionalGeneration` checkpoint: `model.vision_tower.timm_model.`
(the timm encoder) and `model.embed_vision.`. A name or shape that does not match is reported with
every offending tensor before anything is converted.

Example:
    >>> config = vision_config_from_hf(hf_config['vision_config'])       # MOBILENET_V5_300M
    >>> tower = vision_tower_from_hf(state, config)                      # state: {HF name: array}
    >>> embedder = embed_vision_from_hf(state, config, text_width=2048)
    >>> tower, embedder = load_vision('/ckpts/gemma-3n-E4B-it', MOBILENET_V5_300M, text_width=2048)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gemma3n.checkpoints.flat_params import flatten_params
from gemma3n.checkpoints.hf_tensors import Stored, read_params
from gemma3n.layers.weights import weight_schema
from gemma3n.layers.norm import RMS_NORM_EPS
from gemma3n.multimodal_embedder import MultimodalEmbedder
from gemma3n.towers import vision_embedder as _vision_embedder
from gemma3n.vision.mobilenet import config as mnv5
from gemma3n.vision.mobilenet.config import MOBILENET_V5_300M, BlockSpec, MobileNetConfig
from gemma3n.vision.mobilenet.encoder import MobileNetV5

HF_VISION_TOWER_PREFIX = "model.vision_tower.timm_model."
HF_EMBED_VISION_PREFIX = "model.embed_vision."
# Gemma 3n's vision embedder: 128 hard tokens right after the 262144-entry text vocabulary.
VISION_VOCAB_SIZE = 128
VISION_VOCAB_OFFSET = 262_144
# The one timm architecture whose block list we carry (HF `vision_config.architecture`).
HF_ARCHITECTURE = "mobilenetv5_300m_enc"
# model_args of a smaller tower -> our MobileNetConfig fields.
_MODEL_ARGS = {"block_args": "stages", "stem_size": "stem_channels",
               "msfa_output_resolution": "msfa_resolution"}
_BLOCK = re.compile(r"^blocks_(\d+)_(\d+)$")
Shape = tuple[int, ...]


class _Rule(NamedTuple):
    """One leaf kind: HF leaf name (None: ours), HF shape from ours, HF array -> ours."""
    hf_leaf: str | None
    hf_shape: Callable[[Shape], Shape]
    to_ours: Callable[[np.ndarray], np.ndarray]


_SAME = _Rule(None, lambda s: s, lambda x: x)
_RULES = {
    "kernel": _Rule("weight", lambda s: (s[3], s[2], s[0], s[1]), lambda x: x.transpose(2, 3, 1, 0)),
    "scale": _Rule("weight", lambda s: s, lambda x: x),
    "w": _Rule("weight", lambda s: s, lambda x: x),      # the embedder's, declared [out, in]
    "embedding": _Rule("embedding.weight", lambda s: s, lambda x: x),
}


def hf_name(path: str) -> str:
    """HF tensor name (without prefix) of our leaf `path` ('a/b/leaf')."""
    *modules, leaf = path.split("/")
    parts = [_BLOCK.sub(r"blocks.\1.\2", module) for module in modules]
    hf_leaf = _RULES.get(leaf, _SAME).hf_leaf
    return ".".join(parts + [hf_leaf if hf_leaf is not None else leaf])


def _stored(shapes: Mapping[str, Shape], dtype: Any) -> dict[str, Stored]:
    """How the checkpoint stores each of our leaves `shapes` ({path: shape})."""
    stored = {}
    for path, shape in shapes.items():
        rule = _RULES.get(path.rsplit("/", 1)[-1], _SAME)
        stored[path] = Stored(hf_name(path), rule.hf_shape(tuple(shape)), dtype, rule.to_ours)
    return stored


def vision_tower_shapes(config: MobileNetConfig) -> dict[str, Shape]:
    """{our leaf path: shape} of `MobileNetV5(config)`."""
    side = config.image_size
    pixels = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    tree = jax.eval_shape(lambda x: MobileNetV5(config).init(jax.random.key(0), x)["params"],
                          pixels)
    return {path: leaf.shape for path, leaf in flatten_params(tree).items()}


def parse_timm_block(text: str) -> tuple[BlockSpec, ...]:
    """One entry of timm's block notation (`er_r1_k3_s2_e4_c128`, `uir_r2_a5_k0_s1_e4_c256`,
    `mqa_r1_k3_h4_v2_s1_d64_c640`) -> its `r` repeated blocks; ValueError naming `text`."""
    kind, *options = text.split("_")
    try:
        values = {option[0]: float(option[1:]) for option in options}
        make = {"er": lambda v: mnv5.EdgeResidual(int(v["c"]), int(v["k"]), int(v["s"]), v["e"]),
                "uir": lambda v: mnv5.InvertedBottleneck(int(v["c"]), int(v["a"]), int(v["k"]),
                                                         int(v["s"]), v["e"]),
                "mqa": lambda v: mnv5.MultiQueryAttention(int(v["c"]), int(v["h"]), int(v["d"]),
                                                          int(v.get("v", 1)), int(v["k"]))}[kind]
        block = make(values)
    except (KeyError, ValueError, IndexError) as error:
        raise ValueError(f"cannot read timm block {text!r} (kinds er, uir, mqa): {error}"
                         ) from None
    if kind == "mqa" and values.get("s", 1) != 1:
        raise ValueError(f"timm block {text!r}: strided attention blocks are not supported")
    return (block,) * int(values.get("r", 1))


def vision_config_from_hf(hf_vision: Mapping[str, Any],
                          image_size: int = MOBILENET_V5_300M.image_size) -> MobileNetConfig:
    """Our tower config from a HF `vision_config` (config.json) and the processor's image size;
    ValueError naming the field for a tower we cannot build.

    The released tower has no `model_args`. A smaller tower of the same architecture may give
    `model_args` = {"block_args": [[timm block strings] per stage], "stem_size": ...,
    "msfa_output_resolution": ...} (timm's notation, see `parse_timm_block`).
    """
    config = MOBILENET_V5_300M
    got = {"architecture": hf_vision.get("architecture"),
           "hidden_size": hf_vision.get("hidden_size", config.hidden_size)}
    want = {"architecture": HF_ARCHITECTURE, "hidden_size": config.hidden_size}
    wrong = [f"{key}={got[key]!r} (supported: {want[key]!r})" for key in want
             if got[key] != want[key]]
    args = dict(hf_vision.get("model_args") or {})
    unknown = sorted(set(args) - set(_MODEL_ARGS))
    if unknown:
        wrong.append(f"model_args {unknown} (supported: {sorted(_MODEL_ARGS)})")
    if wrong:
        raise ValueError(f"unsupported vision tower in vision_config: {', '.join(wrong)}")
    changes = {ours: args[theirs] for theirs, ours in _MODEL_ARGS.items() if theirs in args}
    if "stages" in changes:
        changes["stages"] = tuple(sum((parse_timm_block(text) for text in stage), ())
                                  for stage in changes["stages"])
    return dataclasses.replace(config, image_size=image_size, **changes)


def vision_embedder(config: MobileNetConfig, text_width: int, *,
                    vocab_size: int = VISION_VOCAB_SIZE,
                    vocab_offset: int = VISION_VOCAB_OFFSET,
                    eps: float = RMS_NORM_EPS) -> MultimodalEmbedder:
    """Gemma 3n's vision embedder for a tower of `config` and a text model of `text_width`
    (`vocab_size` / `vocab_offset` / `eps`: HF `vision_config.vocab_size` / `.vocab_offset` /
    `.rms_norm_eps`)."""
    return _vision_embedder(config, text_width, vocab_size=vocab_size, vocab_offset=vocab_offset,
                            eps=eps)


def vision_tower_from_hf(state: Mapping[str, Any], config: MobileNetConfig, *,
                         prefix: str = HF_VISION_TOWER_PREFIX,
                         dtype: Any = np.float32) -> dict[str, Any]:
    """`MobileNetV5(config)` params from HF tensors `state` (name -> array; other keys ignored).

    Raises ValueError listing missing, unexpected (under `prefix`) and wrongly shaped tensors.
    """
    return read_params(state, _stored(vision_tower_shapes(config), dtype), prefix=prefix,
                       what="vision tower")


def embed_vision_from_hf(state: Mapping[str, Any], config: MobileNetConfig, text_width: int, *,
                         prefix: str = HF_EMBED_VISION_PREFIX, dtype: Any = np.float32,
                         **embedder: Any) -> dict[str, Any]:
    """`vision_embedder(config, text_width, **embedder)` params from HF tensors `state`."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    soft = jax.ShapeDtypeStruct((1, 1, config.hidden_size), jnp.float32)
    schema = weight_schema(vision_embedder(config, text_width, **embedder), ids, soft)
    shapes = {path: info.shape for path, info in schema.items()}
    return read_params(state, _stored(shapes, dtype), prefix=prefix, what="vision embedder")


def load_vision(path: str | os.PathLike, config: MobileNetConfig, text_width: int, *,
                dtype: Any = np.float32) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tower params, embedder params) from a HF safetensors file or checkpoint directory,
    reading only the vision tensors."""
    # safetensors_hf reads whole checkpoints through this module (hf_towers): imported here.
    from gemma3n.checkpoints.safetensors_hf import open_hf_files
    files = open_hf_files(Path(path))
    prefixes = (HF_VISION_TOWER_PREFIX, HF_EMBED_VISION_PREFIX)
    state = {key: files.read(key) for key in files.keys() if key.startswith(prefixes)}
    if not state:
        raise ValueError(f"{os.fspath(path)} holds no vision tensors (nothing under "
                         f"{' or '.join(repr(p) for p in prefixes)}): not a multimodal Gemma 3n "
                         f"checkpoint?")
    return (vision_tower_from_hf(state, config, dtype=dtype),
            embed_vision_from_hf(state, config, text_width, dtype=dtype))
