"""The mapping between our `TransformerConfig` and Hugging Face `transformers`' Gemma 3n text config.

`hf_text_config` gives `Gemma3nTextConfig(**kwargs)` arguments for our config, `config_from_hf`
reads a config.json dict back, `check_hf_config` lists where a checkpoint's config.json and a
model differ, and `check_representable` says which of our settings HF cannot express (the
parameter mapping, `gemma3n.checkpoints.hf_mapping`, needs an expressible config).

Example:
    >>> kwargs = hf_text_config(config)                      # -> transformers.Gemma3nTextConfig(**kwargs)
    >>> config = config_from_hf(json.load(open('config.json')))
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from gemma3n.config import AttentionType, QueryPreAttentionNormalisation, TransformerConfig

# HF's text vocabulary carries 128 vision + 128 audio token rows after ours (copies of the pad row
# in the released checkpoints; docs/architecture.md §8).
HF_EXTRA_VOCAB = 256
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
# How a config.json says "no cap" to HF: cap * tanh(x / cap) is x to within float32 rounding
# (x / 1e20 stays a normal float32 for |x| > 1e-18, where tanh is the identity to the last bit;
# float32 and bfloat16 hold 1e20, float16 would not). Caps this large read back as None.
HF_NO_SOFTCAP = 1e20
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
    """The final logit softcap a HF config.json applies (its default when the field is absent);
    None for none, or for a cap of `HF_NO_SOFTCAP` or more, which changes nothing."""
    cap = _hf_text(hf_config).get('final_logit_softcapping', HF_DEFAULT_FINAL_LOGIT_SOFTCAP)
    return None if cap is None or cap >= HF_NO_SOFTCAP else cap


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
