"""The one mapping between our parameter tree and Hugging Face `transformers` Gemma 3n text weights.

Our tree is the nested Flax `params` dict of `Gemma3nTransformer(text_only=True)`; its '/'-joined
paths are those of `tests/data/gemma3n_e4b_text_only_params.json`. Hugging Face keys are given
relative to `Gemma3nTextModel` (`embed_tokens.weight`, `layers.3.self_attn.q_proj.weight`, ...);
callers add a prefix: `model.` for `Gemma3nForCausalLM`, `model.language_model.` for the released
hub checkpoints (`Gemma3nForConditionalGeneration`).

Everything is driven by `mapping_entries(config)`, one `ParamMapping` per parameter of our tree:
paths, shapes and fan-in axes are the weight schema's (`gemma3n.schema.text_schema`, from shapes
alone, so full-size models are described cheaply); this module only adds HF key names and
the name of the layout conversion each needs (`hf_layouts`: plain numpy transposes and reshapes,
bit-exact in both directions).

Example:
    >>> cfg = TransformerConfig.gemma3n(num_layers=10, num_shared_layers=5, embed_dim=32,
    ...     hidden_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, num_embed=300,
    ...     per_layer_input_dim=8, laurel_rank=4, sliding_window_size=8)
    >>> hf = params_to_hf(params, cfg, prefix='model.')          # {key: np.ndarray}
    >>> params, dropped = hf_to_params(hf.__getitem__, hf.keys(), cfg, prefix='model.')
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from gemma3n.checkpoints.flat_params import flatten_params, unflatten_params
from gemma3n.checkpoints.hf_config import (HF_DEFAULT_FINAL_LOGIT_SOFTCAP, HF_EXTRA_VOCAB,
                                           check_hf_config, check_representable, config_from_hf,
                                           hf_final_logit_softcap, hf_text_config)
from gemma3n.checkpoints.hf_layouts import CONVERSIONS
from gemma3n.config import TransformerConfig
from gemma3n.host_arrays import aligned_empty
from gemma3n.layers.weights import WeightInfo
from gemma3n.schema import text_schema
from gemma3n.validation import check_finite

# The config mapping (`hf_config`) and the tree helpers (`flat_params`) have their own modules;
# callers that import them from here keep working.
__all__ = ['DroppedWeights', 'FLOAT_DTYPES', 'HF_DEFAULT_FINAL_LOGIT_SOFTCAP', 'HF_EXTRA_VOCAB',
           'ParamMapping', 'Transform', 'check_hf_config', 'check_representable', 'config_from_hf',
           'detect_hf_prefix', 'flatten_params', 'hf_final_logit_softcap', 'hf_text_config',
           'hf_to_params', 'mapping_entries', 'params_to_hf', 'unflatten_params']
# A per-parameter conversion applied while loading: (our '/'-joined path, array) -> stored leaf.
Transform = Callable[[str, np.ndarray], Any]
FLOAT_DTYPES = frozenset(np.dtype(t) for t in ('float16', 'float32', 'float64', ml_dtypes.bfloat16))


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """One parameter of our tree and the Hugging Face tensor(s) holding the same numbers.

    `conversion` names the layout change (`hf_layouts.CONVERSIONS`); `in_axes` are the axes of our array
    that are contracted with the layer input (its fan-in), empty for norm scales.

    Example:
        >>> e = next(e for e in mapping_entries(cfg) if e.path == 'layer_0/attn/q_einsum/w')
        >>> e.hf_keys, e.conversion        # (('layers.0.self_attn.q_proj.weight',), 'heads_in')
    """
    path: str
    shape: tuple[int, ...]
    hf_keys: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    conversion: str
    in_axes: tuple[int, ...] = ()

    @property
    def is_scale(self) -> bool:
        """Multiplicative scales (norm weights, AltUp output scale): initialise around 1, not 0."""
        return not self.in_axes


@dataclasses.dataclass
class DroppedWeights:
    """What `hf_to_params` read past because our model has no such parameter.

    Example:
        >>> params, dropped = hf_to_params(get, keys, cfg, prefix='model.language_model.')
        >>> print(dropped.summary())
    """
    kv_shared_keys: list[str] = dataclasses.field(default_factory=list)
    outside_keys: list[str] = dataclasses.field(default_factory=list)
    extra_vocab_rows: int = 0
    skipped_keys: list[str] = dataclasses.field(default_factory=list)   # ours, left unread on request

    def summary(self) -> str:
        parts = []
        if self.kv_shared_keys:
            layers = sorted({int(_KV_SHARED_KEY.search(k).group(1)) for k in self.kv_shared_keys})
            parts.append(f'{len(self.kv_shared_keys)} k_proj/v_proj/k_norm tensors of KV-shared layers '
                         f'{layers[0]}-{layers[-1]}')
        if self.extra_vocab_rows:
            parts.append(f'{self.extra_vocab_rows} extra vocabulary rows of embed_tokens')
        if self.outside_keys:
            groups = collections.Counter('.'.join(k.split('.')[:2]) for k in self.outside_keys)
            listed = ', '.join(f'{g}.* ({n})' for g, n in sorted(groups.items()))
            parts.append(f'{len(self.outside_keys)} tensors outside the text decoder: {listed}')
        if self.skipped_keys:
            parts.append(f'{", ".join(self.skipped_keys)} (not read: skipped on request)')
        return 'dropped ' + ('; '.join(parts) if parts else 'nothing')


_KV_SHARED_KEY = re.compile(r'layers\.(\d+)\.self_attn\.(?:k_proj|v_proj|k_norm)\.weight')


# --- the entries ------------------------------------------------------------------------------------

def mapping_entries(config: TransformerConfig, *, hf_vocab_size: int | None = None) -> list[ParamMapping]:
    """Every parameter of our text tree for `config`, with its HF key(s), shapes and conversion.

    Paths, shapes and fan-in axes come from the weight schema (`gemma3n.schema.text_schema`);
    this mapping only adds HF names and layout conversions. `hf_vocab_size` is the row count of
    HF's `embed_tokens` (default `num_embed + HF_EXTRA_VOCAB`, as in the released checkpoints).
    """
    check_representable(config)
    v = config.num_embed
    hf_vocab_size = v + HF_EXTRA_VOCAB if hf_vocab_size is None else hf_vocab_size
    if hf_vocab_size < v:
        raise ValueError(f'hf_vocab_size={hf_vocab_size} is smaller than num_embed={v}.')
    entries = {}
    for path, info in text_schema(config).items():
        hf_keys, conversion, order = _hf_names(path, info)
        if conversion == 'pad_vocab' and hf_vocab_size == v:
            conversion = 'identity'
        hf_shapes = CONVERSIONS[conversion].hf_shapes(info.shape, len(hf_keys), hf_vocab_size)
        entries[order] = ParamMapping(path, info.shape, hf_keys, hf_shapes, conversion, info.in_axes)
    return [entries[order] for order in sorted(entries)]


# Our path (AltUp indices as groups) -> HF key(s) relative to `Gemma3nTextModel`, and the
# conversion between our layout and HF's: the weights outside the layers, then (`_LAYER_NAMES`,
# relative to `layer_N/` and `layers.N.`) those of every layer.
_MODEL_NAMES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ('embedder/input_embedding', ('embed_tokens.weight',), 'pad_vocab'),
    ('embedder/per_layer_input_embedding', ('embed_tokens_per_layer.weight',), 'reshape'),
    ('embedder/per_layer_input_projection/w', ('per_layer_model_projection.weight',),
     'flatten_transpose'),
    ('embedder/per_layer_projection_norm/scale', ('per_layer_projection_norm.weight',), 'identity'),
    (r'altup_projection_(\d+)/altup_projection_\1', ('altup_projections.{0}.weight',), 'transpose'),
    (r'altup_unembed_projection_(\d+)/altup_unembed_projection_\1',
     ('altup_unembed_projections.{0}.weight',), 'transpose'),
    ('final_norm/scale', ('norm.weight',), 'identity'),
)
_LAYER_NAMES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ('attn/q_einsum/w', ('self_attn.q_proj.weight',), 'heads_in'),
    ('attn/kv_einsum/w', ('self_attn.k_proj.weight', 'self_attn.v_proj.weight'), 'stacked_heads_in'),
    ('attn/key_norm/scale', ('self_attn.k_norm.weight',), 'identity'),
    ('attn/attn_vec_einsum/w', ('self_attn.o_proj.weight',), 'transpose_flatten'),
    ('attn/query_norm/scale', ('self_attn.q_norm.weight',), 'identity'),
    ('pre_attention_norm/scale', ('input_layernorm.weight',), 'identity'),
    ('post_attention_norm/scale', ('post_attention_layernorm.weight',), 'identity'),
    ('pre_ffw_norm/scale', ('pre_feedforward_layernorm.weight',), 'identity'),
    ('post_ffw_norm/scale', ('post_feedforward_layernorm.weight',), 'identity'),
    # Stored [2, F, D] it already is torch's [out, in]; [2, D, F] is transposed (see `_hf_names`).
    ('mlp/gating_einsum', ('mlp.gate_proj.weight', 'mlp.up_proj.weight'), 'stacked'),
    ('mlp/linear', ('mlp.down_proj.weight',), 'transpose'),
    ('laurel/linear_left/w', ('laurel.linear_left.weight',), 'transpose'),
    ('laurel/linear_right/w', ('laurel.linear_right.weight',), 'transpose'),
    ('post_laurel_norm/scale', ('laurel.post_laurel_norm.weight',), 'identity'),
    ('altup/correct_output_scale', ('altup.correct_output_scale',), 'identity'),
    ('altup/correction_coefs', ('altup.correction_coefs.weight',), 'transpose'),
    ('altup/prediction_coefs', ('altup.prediction_coefs.weight',), 'flatten_transpose'),
    ('altup/modality_router/w', ('altup.modality_router.weight',), 'transpose'),
    ('altup/router_norm_layer/scale', ('altup.router_norm.weight',), 'identity'),
    ('per_layer_mapping/per_layer_input_gate/w', ('per_layer_input_gate.weight',), 'transpose'),
    ('per_layer_mapping/per_layer_projection/w', ('per_layer_projection.weight',), 'transpose'),
    ('per_layer_mapping/post_per_layer_input_norm/scale', ('post_per_layer_input_norm.weight',),
     'identity'),
)
_LAYER = r'layer_(\d+)/'
_HF_LAYER = 'layers.{0}.'
_NAME_RULES = _MODEL_NAMES + tuple((_LAYER + path, tuple(_HF_LAYER + key for key in keys), conversion)
                                   for path, keys, conversion in _LAYER_NAMES)
_COMPILED_RULES = tuple((re.compile(pattern), keys, conversion) for pattern, keys, conversion in _NAME_RULES)
GATING_PATH = 'mlp/gating_einsum'


def _hf_names(path: str, info: WeightInfo) -> tuple[tuple[str, ...], str, tuple[float, ...]]:
    """(HF keys, conversion, sort key) of our parameter `path`, declared as `info`.

    The sort key orders parameters as HF lists them: the embedder's, the AltUp projections pair
    by pair, the final norm, then layer by layer (so `mapping_entries`, and the random trees the
    tests draw from it, keep one order).
    """
    for rule, (pattern, keys, conversion) in enumerate(_COMPILED_RULES):
        match = pattern.fullmatch(path)
        if match:
            if path.endswith(GATING_PATH) and info.in_axes != (len(info.shape) - 1,):
                conversion = 'stacked_transpose'    # [2, D, F]: each half transposed
            if path.startswith('layer_'):
                order = (int(match.group(1)), 0, rule)
            elif match.groups():             # an AltUp projection: pair by pair
                order = (-1, int(match.group(1)), rule)
            else:                            # the embedder's first, the final norm last
                order = (-1, -1 if path.startswith('embedder/') else math.inf, rule)
            return tuple(key.format(*match.groups()) for key in keys), conversion, order
    raise ValueError(f'{path}: no Hugging Face name for this parameter.')


# --- both directions --------------------------------------------------------------------------------

def params_to_hf(
        params: Mapping[str, Any],
        config: TransformerConfig,
        *,
        prefix: str = '',
        hf_vocab_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Our (nested) params -> {prefix + HF key: C-contiguous np.ndarray}, same dtypes, bit-exact.

    Raises ValueError when the tree has missing, extra or wrongly shaped parameters.
    """
    flat = {path: np.asarray(leaf) for path, leaf in flatten_params(params).items()}
    entries = mapping_entries(config, hf_vocab_size=hf_vocab_size)
    expected = {e.path for e in entries}
    missing, extra = sorted(expected - flat.keys()), sorted(flat.keys() - expected)
    if missing or extra:
        raise ValueError(f'Parameter tree does not match the config: missing {missing}, unexpected {extra}.')
    out = {}
    for e in entries:
        x = flat[e.path]
        if x.shape != e.shape:
            raise ValueError(f'Parameter {e.path} has shape {x.shape}, expected {e.shape} for this config.')
        for key, y in zip(e.hf_keys, CONVERSIONS[e.conversion].to_hf(x, e.shape, e.hf_shapes)):
            out[prefix + key] = np.ascontiguousarray(y)
    return out


def hf_to_params(
        get_tensor: Callable[[str], np.ndarray],
        keys: Iterable[str],
        config: TransformerConfig,
        *,
        prefix: str = '',
        dtype: Any = None,
        progress: Callable[[int], None] | None = None,
        describe: Callable[[str], str] = str,
        skip: Collection[str] = (),
        transform: Transform | None = None,
) -> tuple[dict[str, Any], DroppedWeights]:
    """HF tensors -> (our nested params, what was dropped).

    `keys` are all tensor names of the checkpoint; `get_tensor(key)` reads one tensor (called once per
    kept key, largest parameters first, so a lazy reader holds one source tensor at a time). Results
    are C-contiguous arrays in `dtype` (default: the checkpoint's dtype); an array needing no layout or
    dtype change may be returned as is. `progress(n)` is called after each parameter with its number
    of elements; `describe(key)` names a tensor in error messages (e.g. with its file). Raises
    ValueError naming the HF key for a missing tensor, an unexpected tensor under `prefix`, a wrong
    shape or a non-float dtype; nothing is returned in that case. `skip` names paths of our tree to
    leave out: their HF tensors must still be present but are neither read nor checked.
    `transform(path, array)`, when given, converts each parameter as soon as it is read (e.g. to
    a serving layout on the device); its result is what the tree holds. A parameter holding NaN
    or Inf (after the cast to `dtype`) raises ValueError naming its HF tensor.
    """
    keys = set(keys)
    # The default HF vocabulary (> num_embed) selects the row-dropping conversion; the shape check
    # accepts any row count >= num_embed.
    entries = mapping_entries(config)
    unknown_skips = sorted(set(skip) - {e.path for e in entries})
    if unknown_skips:
        raise ValueError(f'Cannot skip {_abbreviate(unknown_skips)}: not parameters of this model config.')
    known = {prefix + key for e in entries for key in e.hf_keys}
    missing = sorted(known - keys)
    if missing:
        raise ValueError(f'Checkpoint lacks {len(missing)} tensor(s) of the text decoder: '
                         f'{_abbreviate(missing)} (prefix {prefix!r}).')
    dropped = DroppedWeights()
    unexpected = []
    for key in sorted(keys - known):
        if not key.startswith(prefix):
            dropped.outside_keys.append(key)
            continue
        match = _KV_SHARED_KEY.fullmatch(key[len(prefix):])
        if match and config.num_unshared_layers <= int(match.group(1)) < config.num_layers:
            dropped.kv_shared_keys.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f'Checkpoint has {len(unexpected)} tensor(s) under {prefix!r} that this model '
                         f'config does not have: {_abbreviate(unexpected)} (a different model size?).')

    dropped.skipped_keys = [prefix + key for e in entries if e.path in skip for key in e.hf_keys]
    flat = {}
    for e in sorted((e for e in entries if e.path not in skip), key=lambda e: -math.prod(e.shape)):
        sources = []
        for key, expected in zip(e.hf_keys, e.hf_shapes):
            x = np.asarray(get_tensor(prefix + key))
            if not _shape_matches(e, x.shape, expected):
                want = f'(>= {e.shape[0]}, {", ".join(map(str, expected[1:]))})' if e.conversion == 'pad_vocab' \
                    else str(expected)
                raise ValueError(f'Tensor {describe(prefix + key)} has shape {x.shape}, expected {want} '
                                 f'(for {e.path}).')
            if x.dtype not in FLOAT_DTYPES:
                raise ValueError(f'Tensor {describe(prefix + key)} has dtype {x.dtype}, expected a float dtype.')
            if e.conversion == 'pad_vocab':
                dropped.extra_vocab_rows = x.shape[0] - e.shape[0]
            sources.append(x)
        # A transform gets the layout change as a view where possible: it makes the one copy it
        # needs (for our serving layout often none: HF's [out, in] weights already are).
        with np.errstate(over='ignore'):      # check_finite reports it, naming the tensor
            value = _materialise(CONVERSIONS[e.conversion].from_hf(sources, e.shape), e.shape, dtype,
                                 contiguous=transform is None)
        del sources
        check_finite(f'Tensor {describe(prefix + e.hf_keys[0])}', value)
        flat[e.path] = value if transform is None else transform(e.path, value)
        del value
        if progress is not None:
            progress(math.prod(e.shape))
    return unflatten_params(flat), dropped


def _shape_matches(e: ParamMapping, actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    if e.conversion == 'pad_vocab':
        return len(actual) == len(expected) and actual[0] >= e.shape[0] and actual[1:] == expected[1:]
    return tuple(actual) == tuple(expected)


def _materialise(converted: np.ndarray | Sequence[np.ndarray], shape: tuple[int, ...], dtype: Any,
                 contiguous: bool = True) -> np.ndarray:
    """One array in `dtype`, C-contiguous when asked; copies only when layout or dtype require it."""
    if isinstance(converted, np.ndarray):
        return np.asarray(converted, dtype=dtype or converted.dtype, order='C' if contiguous else 'K')
    out = aligned_empty(shape, dtype or np.result_type(*converted))
    for i, part in enumerate(converted):
        out[i] = part
    return out


def _abbreviate(names: Sequence[str], limit: int = 8) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')


def detect_hf_prefix(keys: Iterable[str]) -> str:
    """The prefix under which a checkpoint stores `Gemma3nTextModel` (found via `embed_tokens_per_layer`)."""
    marker = 'embed_tokens_per_layer.weight'
    prefixes = sorted(key[:-len(marker)] for key in keys if key.endswith(marker))
    if len(prefixes) != 1:
        raise ValueError(f'Not a Gemma 3n text checkpoint: expected exactly one tensor named *{marker}, '
                         f'found {len(prefixes)}{": " + ", ".join(prefixes) if prefixes else ""}.')
    return prefixes[0]


