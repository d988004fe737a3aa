"""The one mapping between our parameter tree and Hugging Face `transformers` Gemma 3n text weights.

Our tree is the nested Flax `params` dict of `Gemma3nTransformer(text_only=True)`; its '/'-joined
paths are those of `tests/data/gemma3n_e4b_text_only_params.json`. Hugging Face keys are given
relative to `Gemma3nTextModel` (`embed_tokens.weight`, `layers.3.self_attn.q_proj.weight`, ...);
callers add a prefix: `model.` for `Gemma3nForCausalLM`, `model.language_model.` for the released
hub checkpoints (`Gemma3nForConditionalGeneration`).

Everything is driven by `mapping_entries(config)`, one `ParamMapping` per parameter of our tree:
paths, shapes and fan-in axes are the weight schema's (`gemma3n.schema.text_schema`, from shapes
alone, so full-size models are described cheaply); this module only adds HF key names and
conversions. Conversions are plain numpy array operations (transposes and reshapes), bit-exact
in both directions.

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

import flax.linen as nn
import ml_dtypes
import numpy as np

from gemma3n.config import AttentionType, QueryPreAttentionNormalisation, TransformerConfig
from gemma3n.host_arrays import aligned_empty
from gemma3n.layers.weights import WeightInfo
from gemma3n.schema import text_schema
from gemma3n.validation import check_finite

# A per-parameter conversion applied while loading: (our '/'-joined path, array) -> stored leaf.
Transform = Callable[[str, np.ndarray], Any]
# HF's text vocabulary carries 128 vision + 128 audio token rows after ours (copies of the pad row
# in the released checkpoints; docs/architecture.md §8).
HF_EXTRA_VOCAB = 256
PAD_TOKEN_ID = 0
# gemma's AltUp router always predicts 4 modality weights; HF uses `altup_num_inputs` instead, so
# only configs with 4 AltUp inputs are representable in HF.
ALTUP_NUM_MODALITIES = 4
RMS_NORM_EPS = 1e-6
HF_HIDDEN_ACTIVATION = 'gelu_pytorch_tanh'
HF_LAYER_TYPES = {
        AttentionType.GLOBAL: 'full_attention',
        AttentionType.LOCAL_SLIDING: 'sliding_attention',
}
# HF requires a float final softcap (None is rejected by its config validation); its default.
HF_DEFAULT_FINAL_LOGIT_SOFTCAP = 30.0
# Gemma3nTextConfig defaults for the fields `check_hf_config` reads, used when config.json omits one.
HF_DEFAULT_ROPE_THETA = {'full_attention': 1_000_000.0, 'sliding_attention': 10_000.0}
HF_DEFAULT_PATTERN_LENGTH = 5
HF_DEFAULT_NUM_SPARSE_LAYERS = 10
HF_DEFAULT_SPARSITY = 0.95
HF_TEXT_DEFAULTS: dict[str, Any] = dict(
        vocab_size=262_400, hidden_size=2048, intermediate_size=16_384, num_hidden_layers=35,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256, hidden_activation=HF_HIDDEN_ACTIVATION,
        rms_norm_eps=RMS_NORM_EPS, attention_bias=False, sliding_window=512,
        vocab_size_per_layer_input=262_144, hidden_size_per_layer_input=256, altup_active_idx=0,
        altup_coef_clip=120.0, altup_correct_scale=True, altup_num_inputs=4, num_kv_shared_layers=15,
        laurel_rank=64,
)
SPARSITY_TOLERANCE = 1e-6   # config.json stores sparsity targets as decimal floats
# config.json fields with one entry per layer: compared entry by entry when the depths agree.
PER_LAYER_FIELDS = ('layer_types', 'activation_sparsity_pattern')
FLOAT_DTYPES = frozenset(np.dtype(t) for t in ('float16', 'float32', 'float64', ml_dtypes.bfloat16))


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """One parameter of our tree and the Hugging Face tensor(s) holding the same numbers.

    `conversion` names the layout change (see `_CONVERSIONS`); `in_axes` are the axes of our array
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


# --- conversions: our array <-> HF arrays -----------------------------------------------------------
# `to_hf(x, entry)` returns one array per HF key; `from_hf(xs, entry)` returns our layout, as views
# of the inputs where the layout allows (the caller materialises once, in the target dtype).

def _heads_in_to_hf(x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    # [N, D, H] contracts D in the middle: go through [N, H, D] so rows are heads-major (n*H + h).
    return x.transpose(0, 2, 1).reshape(hf_shape)


def _heads_in_from_hf(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n, d, h = shape
    return x.reshape(n, h, d).transpose(0, 2, 1)


def _pad_vocab_to_hf(x: np.ndarray, e: ParamMapping) -> tuple[np.ndarray, ...]:
    extra = e.hf_shapes[0][0] - e.shape[0]
    # The released checkpoints fill the extra rows with copies of the pad row.
    return (np.concatenate([x, np.broadcast_to(x[PAD_TOKEN_ID], (extra,) + x.shape[1:])]),)


_Conversion = collections.namedtuple('_Conversion', ['to_hf', 'from_hf'])
_CONVERSIONS: dict[str, _Conversion] = {
        'identity': _Conversion(lambda x, e: (x,), lambda xs, e: xs[0]),
        'transpose': _Conversion(lambda x, e: (x.T,), lambda xs, e: xs[0].T),
        'reshape': _Conversion(lambda x, e: (x.reshape(e.hf_shapes[0]),), lambda xs, e: xs[0].reshape(e.shape)),
        # [a, b, c] -> [b*c, a]: per-layer input projection [D, L, P], AltUp prediction coefs [M, A, A].
        'flatten_transpose': _Conversion(
                lambda x, e: (x.reshape(e.shape[0], -1).T,), lambda xs, e: xs[0].T.reshape(e.shape)),
        # [a, b, c] -> [c, a*b]: attention output [N, H, D] -> o_proj [D, N*H].
        'transpose_flatten': _Conversion(
                lambda x, e: (x.reshape(-1, e.shape[-1]).T,), lambda xs, e: xs[0].T.reshape(e.shape)),
        'heads_in': _Conversion(
                lambda x, e: (_heads_in_to_hf(x, e.hf_shapes[0]),),
                lambda xs, e: _heads_in_from_hf(xs[0], e.shape)),
        # Stacked pairs: kv_einsum [2, K, D, H] -> k_proj, v_proj; gating_einsum [2, F, D] -> gate, up.
        'stacked_heads_in': _Conversion(
                lambda x, e: tuple(_heads_in_to_hf(x[i], s) for i, s in enumerate(e.hf_shapes)),
                lambda xs, e: [_heads_in_from_hf(x, e.shape[1:]) for x in xs]),
        'stacked': _Conversion(lambda x, e: tuple(x), lambda xs, e: list(xs)),
        'stacked_transpose': _Conversion(lambda x, e: tuple(y.T for y in x), lambda xs, e: [x.T for x in xs]),
        'pad_vocab': _Conversion(_pad_vocab_to_hf, lambda xs, e: xs[0][:e.shape[0]]),
}


# --- the entries ------------------------------------------------------------------------------------

def check_representable(config: TransformerConfig) -> None:
    """Raises ValueError naming every setting that HF's Gemma 3n (and so this mapping) cannot express."""
    problems = []
    required = dict(use_altup=True, use_laurel=True, use_qk_norm=True, qk_norm_with_scale=True,
                    use_value_norm=True, use_post_attn_norm=True, use_post_ffw_norm=True, scale_plus_one=False,
                    attn_logits_soft_cap=None, query_pre_attn_norm=QueryPreAttentionNormalisation.NONE)
    for name, value in required.items():
        if getattr(config, name) != value:
            problems.append(f'{name}={getattr(config, name)!r} (HF Gemma 3n has {value!r})')
    if config.num_altup_inputs != ALTUP_NUM_MODALITIES:
        problems.append(f'num_altup_inputs={config.num_altup_inputs} (must equal the {ALTUP_NUM_MODALITIES} '
                        'AltUp router modalities)')
    if config.num_kv_heads == config.num_heads:
        problems.append('num_kv_heads == num_heads (our tree then uses a fused qkv_einsum, not mapped)')
    if config.per_layer_input_dim <= 0:
        problems.append('per_layer_input_dim must be > 0')
    sharing = config.kv_cache_sharing_config
    if config.num_shared_layers and not (sharing.share_global and sharing.share_local):
        problems.append('KV sharing must cover both global and local layers (HF shares both)')
    if problems:
        raise ValueError('Config cannot be mapped to Hugging Face Gemma 3n: ' + '; '.join(problems))


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
        hf_shapes = _HF_SHAPES[conversion](info.shape, len(hf_keys), hf_vocab_size)
        entries[order] = ParamMapping(path, info.shape, hf_keys, hf_shapes, conversion, info.in_axes)
    return [entries[order] for order in sorted(entries)]


# Our path (layer and AltUp indices as groups) -> HF key(s) relative to `Gemma3nTextModel`, and
# the conversion between our layout and HF's.
_LAYER = r'layer_(\d+)/'
_HF_LAYER = 'layers.{0}.'
_NAME_RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
        ('embedder/input_embedding', ('embed_tokens.weight',), 'pad_vocab'),
        ('embedder/per_layer_input_embedding', ('embed_tokens_per_layer.weight',), 'reshape'),
        ('embedder/per_layer_input_projection/w', ('per_layer_model_projection.weight',), 'flatten_transpose'),
        ('embedder/per_layer_projection_norm/scale', ('per_layer_projection_norm.weight',), 'identity'),
        (r'altup_projection_(\d+)/altup_projection_\1', ('altup_projections.{0}.weight',), 'transpose'),
        (r'altup_unembed_projection_(\d+)/altup_unembed_projection_\1',
         ('altup_unembed_projections.{0}.weight',), 'transpose'),
        ('final_norm/scale', ('norm.weight',), 'identity'),
        (_LAYER + 'attn/q_einsum/w', (_HF_LAYER + 'self_attn.q_proj.weight',), 'heads_in'),
        (_LAYER + 'attn/kv_einsum/w', (_HF_LAYER + 'self_attn.k_proj.weight', _HF_LAYER + 'self_attn.v_proj.weight'),
         'stacked_heads_in'),
        (_LAYER + 'attn/key_norm/scale', (_HF_LAYER + 'self_attn.k_norm.weight',), 'identity'),
        (_LAYER + 'attn/attn_vec_einsum/w', (_HF_LAYER + 'self_attn.o_proj.weight',), 'transpose_flatten'),
        (_LAYER + 'attn/query_norm/scale', (_HF_LAYER + 'self_attn.q_norm.weight',), 'identity'),
        (_LAYER + 'pre_attention_norm/scale', (_HF_LAYER + 'input_layernorm.weight',), 'identity'),
        (_LAYER + 'post_attention_norm/scale', (_HF_LAYER + 'post_attention_layernorm.weight',), 'identity'),
        (_LAYER + 'pre_ffw_norm/scale', (_HF_LAYER + 'pre_feedforward_layernorm.weight',), 'identity'),
        (_LAYER + 'post_ffw_norm/scale', (_HF_LAYER + 'post_feedforward_layernorm.weight',), 'identity'),
        # Stored [2, F, D] it already is torch's [out, in]; [2, D, F] is transposed (see `_hf_names`).
        (_LAYER + 'mlp/gating_einsum', (_HF_LAYER + 'mlp.gate_proj.weight', _HF_LAYER + 'mlp.up_proj.weight'),
         'stacked'),
        (_LAYER + 'mlp/linear', (_HF_LAYER + 'mlp.down_proj.weight',), 'transpose'),
        (_LAYER + 'laurel/linear_left/w', (_HF_LAYER + 'laurel.linear_left.weight',), 'transpose'),
        (_LAYER + 'laurel/linear_right/w', (_HF_LAYER + 'laurel.linear_right.weight',), 'transpose'),
        (_LAYER + 'post_laurel_norm/scale', (_HF_LAYER + 'laurel.post_laurel_norm.weight',), 'identity'),
        (_LAYER + 'altup/correct_output_scale', (_HF_LAYER + 'altup.correct_output_scale',), 'identity'),
        (_LAYER + 'altup/correction_coefs', (_HF_LAYER + 'altup.correction_coefs.weight',), 'transpose'),
        (_LAYER + 'altup/prediction_coefs', (_HF_LAYER + 'altup.prediction_coefs.weight',), 'flatten_transpose'),
        (_LAYER + 'altup/modality_router/w', (_HF_LAYER + 'altup.modality_router.weight',), 'transpose'),
        (_LAYER + 'altup/router_norm_layer/scale', (_HF_LAYER + 'altup.router_norm.weight',), 'identity'),
        (_LAYER + 'per_layer_mapping/per_layer_input_gate/w', (_HF_LAYER + 'per_layer_input_gate.weight',),
         'transpose'),
        (_LAYER + 'per_layer_mapping/per_layer_projection/w', (_HF_LAYER + 'per_layer_projection.weight',),
         'transpose'),
        (_LAYER + 'per_layer_mapping/post_per_layer_input_norm/scale',
         (_HF_LAYER + 'post_per_layer_input_norm.weight',), 'identity'),
)
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


# Our shape, number of HF keys, HF vocabulary size -> the HF tensors' shapes.
_HF_SHAPES: dict[str, Callable[[tuple[int, ...], int, int], tuple[tuple[int, ...], ...]]] = {
        'identity': lambda s, n, vocab: (s,),
        'transpose': lambda s, n, vocab: (s[::-1],),
        'reshape': lambda s, n, vocab: ((s[0], math.prod(s[1:])),),
        'flatten_transpose': lambda s, n, vocab: ((math.prod(s[1:]), s[0]),),
        'transpose_flatten': lambda s, n, vocab: ((s[-1], math.prod(s[:-1])),),
        'heads_in': lambda s, n, vocab: ((s[0] * s[2], s[1]),),
        'stacked_heads_in': lambda s, n, vocab: ((s[1] * s[3], s[2]),) * n,
        'stacked': lambda s, n, vocab: (s[1:],) * n,
        'stacked_transpose': lambda s, n, vocab: (s[:0:-1],) * n,
        'pad_vocab': lambda s, n, vocab: ((vocab,) + s[1:],),
}


# --- tree helpers -----------------------------------------------------------------------------------

def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}; leaves declared with logical axes (the towers', boxed by
    `init`) are unboxed."""
    flat = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            flat.update({f'{name}/{sub}': leaf for sub, leaf in flatten_params(value).items()})
        else:
            flat[name] = value.unbox() if isinstance(value, nn.meta.AxisMetadata) else value
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split('/')
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return tree


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
        for key, y in zip(e.hf_keys, _CONVERSIONS[e.conversion].to_hf(x, e)):
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
            value = _materialise(_CONVERSIONS[e.conversion].from_hf(sources, e), e.shape, dtype,
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


# --- configs ----------------------------------------------------------------------------------------

def hf_text_config(config: TransformerConfig, *, hf_vocab_size: int | None = None) -> dict[str, Any]:
    """`Gemma3nTextConfig(**kwargs)` arguments describing `config`.

    `final_logit_softcapping` is our cap, or HF's default 30.0 when ours is None (HF rejects None;
    disable it on the built config object when comparing numbers, docs/architecture.md §8).
    """
    check_representable(config)
    return dict(
            vocab_size=config.num_embed + HF_EXTRA_VOCAB if hf_vocab_size is None else hf_vocab_size,
            vocab_size_per_layer_input=config.num_embed,
            hidden_size=config.embed_dim,
            intermediate_size=config.hidden_dim,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            hidden_activation=HF_HIDDEN_ACTIVATION,
            rms_norm_eps=RMS_NORM_EPS,
            layer_types=[HF_LAYER_TYPES[kind] for kind in config.attention_types],
            sliding_window=config.sliding_window_size or HF_TEXT_DEFAULTS['sliding_window'],
            rope_parameters={HF_LAYER_TYPES[kind]: _hf_rope(config, kind) for kind in HF_LAYER_TYPES},
            num_kv_shared_layers=config.num_shared_layers,
            laurel_rank=config.laurel_rank,
            altup_num_inputs=config.num_altup_inputs,
            altup_coef_clip=config.altup_coef_clip,
            altup_active_idx=0,
            altup_correct_scale=True,
            hidden_size_per_layer_input=config.per_layer_input_dim,
            activation_sparsity_pattern=[config.sparsity(i) for i in range(config.num_layers)],
            final_logit_softcapping=(HF_DEFAULT_FINAL_LOGIT_SOFTCAP if config.final_logit_softcap is None
                                     else float(config.final_logit_softcap)),
            attention_bias=False,
            tie_word_embeddings=True,
    )


def _hf_rope(config: TransformerConfig, kind: AttentionType) -> dict[str, Any]:
    factor = config.scale_factor(kind)
    rope = {'rope_type': 'default', 'rope_theta': float(config.base_frequency(kind))}
    if factor != 1.0:
        rope.update(rope_type='linear', factor=float(factor))
    return rope


def _hf_text(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """The text part of a HF config.json dict: its `text_config` (an empty one is all defaults),
    or the dict itself for a text-only config."""
    text = hf_config.get('text_config')
    return dict(hf_config if text is None else text)


def _hf_layer_types(text: Mapping[str, Any], num_layers: int) -> list[str]:
    """`layer_types`, or HF's default pattern when absent (an explicit list is kept, even empty)."""
    if text.get('layer_types') is not None:
        return list(text['layer_types'])
    return ['full_attention' if (i + 1) % HF_DEFAULT_PATTERN_LENGTH == 0 else 'sliding_attention'
            for i in range(num_layers)]


def _hf_sparsity(text: Mapping[str, Any], num_layers: int) -> list[float]:
    """`activation_sparsity_pattern`, or HF's default when absent."""
    if text.get('activation_sparsity_pattern') is not None:
        return list(text['activation_sparsity_pattern'])
    return _default_sparsity(num_layers)


def hf_final_logit_softcap(hf_config: Mapping[str, Any]) -> float | None:
    """The final logit softcap a HF config.json applies (its default when the field is absent)."""
    text = _hf_text(hf_config)
    return text.get('final_logit_softcapping', HF_DEFAULT_FINAL_LOGIT_SOFTCAP)


def check_hf_config(hf_config: Mapping[str, Any], config: TransformerConfig) -> list[str]:
    """Mismatches between a HF config.json dict (text or multimodal) and `config`, one line per field.

    Missing fields take Gemma3nTextConfig's defaults; the old rope format (`rope_theta`,
    `rope_local_base_freq`, `rope_scaling`) is understood too. `final_logit_softcapping` is not
    compared (see `hf_final_logit_softcap`). Empty list: the checkpoint fits the config.
    """
    text = _hf_text(hf_config)
    model_type = text.get('model_type')
    if model_type not in (None, 'gemma3n_text', 'gemma3n'):
        return [f'model_type={model_type!r}, expected a Gemma 3n text config (gemma3n_text)']
    ours = hf_text_config(config)
    num_layers = text.get('num_hidden_layers', HF_TEXT_DEFAULTS['num_hidden_layers'])
    found = {name: text.get(name, default) for name, default in HF_TEXT_DEFAULTS.items()}
    found['layer_types'] = _hf_layer_types(text, num_layers)
    found['activation_sparsity_pattern'] = _hf_sparsity(text, num_layers)
    found['rope_parameters'] = _hf_rope_from_json(text)
    if not isinstance(found['intermediate_size'], int):
        sizes = set(found['intermediate_size'])
        found['intermediate_size'] = sizes.pop() if len(sizes) == 1 else sorted(sizes)

    problems = []
    same_depth = found['num_hidden_layers'] == ours['num_hidden_layers']
    for name, value in found.items():
        want = ours[name]
        if name == 'vocab_size':
            if value < config.num_embed:
                problems.append(f'vocab_size={value} < num_embed={config.num_embed}')
        elif name in PER_LAYER_FIELDS:
            if same_depth:      # else num_hidden_layers is the difference to report
                problems += _per_layer_difference(name, value, want)
        elif name == 'rope_parameters':
            for layer_type, rope in want.items():
                got = value.get(layer_type, {})
                for field, expected in rope.items():
                    if got.get(field) != expected and not (field == 'rope_type' and _is_identity_rope(got, rope)):
                        problems.append(f'rope_parameters[{layer_type}][{field}]={got.get(field)!r}, '
                                        f'expected {expected!r}')
        elif name == 'sliding_window' and config.sliding_window_size is None:
            continue
        elif _normalise(value) != _normalise(want):
            problems.append(f'{name}={value!r}, expected {want!r}')
    return problems


def _per_layer_difference(name: str, found: Sequence[Any], want: Sequence[Any]) -> list[str]:
    """The first layer where per-layer lists of the same depth differ, and how many do ([] if none)."""
    close = (lambda x, y: abs(x - y) <= SPARSITY_TOLERANCE) if name == 'activation_sparsity_pattern' \
        else (lambda x, y: x == y)
    layers = [i for i, (x, y) in enumerate(zip(found, want)) if not close(x, y)]
    if not layers:
        return []
    first = layers[0]
    more = f' (and {len(layers) - 1} more layers)' if len(layers) > 1 else ''
    return [f'{name}={found[first]!r} at layer {first}{more}, expected {want[first]!r}']


def config_from_hf(hf_config: Mapping[str, Any]) -> TransformerConfig:
    """Our `TransformerConfig` for a HF config.json dict (text or multimodal); inverse of `hf_text_config`.

    Our final logit softcap stays None (the reference's choice); see `hf_final_logit_softcap`.
    Raises ValueError for settings our model cannot express (e.g. per-layer MLP widths).
    """
    text = _hf_text(hf_config)
    if text.get('model_type') not in (None, 'gemma3n_text', 'gemma3n'):
        raise ValueError(f'model_type={text.get("model_type")!r} is not a Gemma 3n text config.')
    get = lambda name: text.get(name, HF_TEXT_DEFAULTS[name])
    num_layers = get('num_hidden_layers')
    widths = get('intermediate_size')
    widths = set(widths) if isinstance(widths, (list, tuple)) else {widths}
    if len(widths) != 1:
        raise ValueError(f'Per-layer MLP widths {sorted(widths)} are not supported (one hidden_dim for all layers).')
    kinds = {name: kind for kind, name in HF_LAYER_TYPES.items()}
    layer_types = _hf_layer_types(text, num_layers)
    if len(layer_types) != num_layers:
        raise ValueError(f'layer_types has {len(layer_types)} entries, num_hidden_layers is {num_layers}.')
    unknown = sorted(set(layer_types) - kinds.keys())
    if unknown:
        raise ValueError(f'Unknown layer_types {unknown}; expected {sorted(kinds)}.')
    rope = _hf_rope_from_json(text)
    theta = lambda name: _normalise(float(rope[name]['rope_theta']))
    factor = lambda name: float(rope[name].get('factor', 1.0)) if rope[name].get('rope_type') == 'linear' else 1.0
    config = TransformerConfig.gemma3n(
            num_layers=num_layers,
            hidden_dim=widths.pop(),
            num_shared_layers=get('num_kv_shared_layers'),
            num_embed=get('vocab_size_per_layer_input'),
            embed_dim=get('hidden_size'),
            num_heads=get('num_attention_heads'),
            num_kv_heads=get('num_key_value_heads'),
            head_dim=get('head_dim'),
            attention_types=tuple(kinds[name] for name in layer_types),
            sliding_window_size=get('sliding_window'),
            global_base_frequency=theta('full_attention'),
            local_base_frequency=theta('sliding_attention'),
            global_scale_factor=factor('full_attention'),
            local_scale_factor=factor('sliding_attention'),
            activation_sparsity_pattern=tuple(_hf_sparsity(text, num_layers)),
            per_layer_input_dim=get('hidden_size_per_layer_input'),
            laurel_rank=get('laurel_rank'),
            num_altup_inputs=get('altup_num_inputs'),
            altup_coef_clip=get('altup_coef_clip'),
    )
    problems = check_hf_config(text, config)
    if problems:
        raise ValueError('HF config cannot be expressed by our TransformerConfig: ' + '; '.join(problems))
    return config


def _default_sparsity(num_layers: int) -> list[float]:
    num_sparse = HF_DEFAULT_NUM_SPARSE_LAYERS if num_layers > HF_DEFAULT_NUM_SPARSE_LAYERS else 0
    return [HF_DEFAULT_SPARSITY] * num_sparse + [0.0] * (num_layers - num_sparse)


def _hf_rope_from_json(text: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if text.get('rope_parameters'):
        return {k: dict(v) for k, v in text['rope_parameters'].items()}
    glob = {'rope_type': 'default', 'rope_theta': text.get('rope_theta', HF_DEFAULT_ROPE_THETA['full_attention'])}
    glob.update(text.get('rope_scaling') or {})
    local = {'rope_type': 'default',
             'rope_theta': text.get('rope_local_base_freq', HF_DEFAULT_ROPE_THETA['sliding_attention'])}
    return {'full_attention': glob, 'sliding_attention': local}


def _is_identity_rope(got: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    # 'linear' with factor 1 is the same rotation as 'default'.
    return got.get('factor', 1.0) == want.get('factor', 1.0)


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
