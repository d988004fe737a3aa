"""Tests of gemma3n.checkpoints.hf_mapping: our parameter tree <-> Hugging Face Gemma 3n keys."""

from __future__ import annotations

import functools
import json

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from gemma3n.checkpoints import hf_mapping
from gemma3n.config import TransformerConfig
from hf_oracle import random_params, small_configs
from reference import E4B_TEXT_PARAMS_JSON

REFERENCE = E4B_TEXT_PARAMS_JSON
E4B_NUM_PARAMS = 751
CONFIGS = small_configs()


def _e4b() -> TransformerConfig:
    return TransformerConfig.gemma3n()


def _flat(params):
    return hf_mapping.flatten_params(params)


@pytest.mark.parametrize('config', CONFIGS, ids=lambda c: f'{c.num_layers}L{c.embed_dim}D')
@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16], ids=['f32', 'bf16'])
def test_round_trip_is_bit_exact(config, dtype):
    params = {k: v.astype(dtype) for k, v in _flat(random_params(config, seed=1)).items()}
    hf = hf_mapping.params_to_hf(hf_mapping.unflatten_params(params), config, prefix='model.language_model.')
    back, dropped = hf_mapping.hf_to_params(hf.__getitem__, hf.keys(), config, prefix='model.language_model.')
    back = _flat(back)
    assert back.keys() == params.keys()
    for path, value in params.items():
        assert back[path].dtype == dtype, path
        assert back[path].flags.c_contiguous, path
        np.testing.assert_array_equal(back[path].view(np.uint8), value.view(np.uint8), err_msg=path)
    assert dropped.extra_vocab_rows == hf_mapping.HF_EXTRA_VOCAB
    assert not dropped.kv_shared_keys and not dropped.outside_keys


def test_e4b_entries_cover_exactly_the_reference_tree():
    reference = json.loads(REFERENCE.read_text())
    entries = hf_mapping.mapping_entries(_e4b())
    ours = {e.path: list(e.shape) for e in entries}
    assert len(ours) == len(entries) == E4B_NUM_PARAMS
    assert ours == {path: spec['shape'] for path, spec in reference.items()}


def test_e4b_hf_keys_and_shapes_equal_transformers_model():
    """HF E4B shapes from a meta-device Gemma3nTextModel (no memory), built from hf_text_config."""
    config = _e4b()
    with torch.device('meta'):
        model = transformers.Gemma3nTextModel(transformers.Gemma3nTextConfig(**hf_mapping.hf_text_config(config)))
    hf_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    ours = {key: shape for e in hf_mapping.mapping_entries(config) for key, shape in zip(e.hf_keys, e.hf_shapes)}
    assert ours == hf_shapes
    assert hf_shapes['embed_tokens.weight'] == (262_400, 2048)
    assert 'layers.20.self_attn.k_proj.weight' not in ours and 'layers.19.self_attn.k_proj.weight' in ours


@pytest.mark.parametrize('config', CONFIGS[:2], ids=lambda c: f'{c.num_layers}L{c.embed_dim}D')
def test_params_to_hf_loads_strictly_into_transformers(config):
    model = transformers.Gemma3nForCausalLM(transformers.Gemma3nTextConfig(**hf_mapping.hf_text_config(config)))
    hf = hf_mapping.params_to_hf(random_params(config, seed=2), config, prefix='model.')
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != 'lm_head.weight'}
    assert {k: v.shape for k, v in hf.items()} == expected
    model.load_state_dict({k: torch.from_numpy(v) for k, v in hf.items()}, strict=False)
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), hf['model.embed_tokens.weight'])


def test_conversions_follow_the_einsum_semantics():
    """Each HF Linear applied to x must equal our einsum of the same weights (independent of round trip)."""
    config = CONFIGS[1]
    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    num_layers, p, a = config.num_layers, config.per_layer_input_dim, config.num_altup_inputs
    params = _flat(random_params(config, seed=3))
    hf = hf_mapping.params_to_hf(hf_mapping.unflatten_params(params), config)
    x = np.random.default_rng(0).standard_normal((5, d)).astype(np.float64)
    linear = lambda key, inp: inp @ hf[key].astype(np.float64).T   # torch nn.Linear semantics
    # float64 sums of the same products: only the summation order differs.
    close = functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-10)

    q = np.einsum('td,ndh->tnh', x, params['layer_0/attn/q_einsum/w'])
    close(linear('layers.0.self_attn.q_proj.weight', x).reshape(5, n, h), q)
    kv = params['layer_0/attn/kv_einsum/w']
    for i, name in enumerate(['k_proj', 'v_proj']):
        close(linear(f'layers.0.self_attn.{name}.weight', x).reshape(5, k, h),
                                   np.einsum('td,kdh->tkh', x, kv[i]))
    heads = np.random.default_rng(1).standard_normal((5, n, h))
    close(linear('layers.0.self_attn.o_proj.weight', heads.reshape(5, n * h)),
                               np.einsum('tnh,nhd->td', heads, params['layer_0/attn/attn_vec_einsum/w']),
                               rtol=1e-10, atol=1e-10)
    gate, up = np.einsum('td,gfd->gtf', x, params['layer_0/mlp/gating_einsum'])
    close(linear('layers.0.mlp.gate_proj.weight', x), gate)
    close(linear('layers.0.mlp.up_proj.weight', x), up)
    proj = np.einsum('td,dlp->tlp', x, params['embedder/per_layer_input_projection/w'])
    close(linear('per_layer_model_projection.weight', x).reshape(5, num_layers, p), proj,
                               rtol=1e-10, atol=1e-10)
    # Per-layer embeddings are layer-major: column l*P + p.
    np.testing.assert_array_equal(hf['embed_tokens_per_layer.weight'][7, 3 * p + 5],
                                  params['embedder/per_layer_input_embedding'][7, 3, 5])
    # AltUp prediction coefficients: HF row i*A + j holds gemma's P[:, i, j].
    coefs = params['layer_2/altup/prediction_coefs']
    np.testing.assert_array_equal(hf['layers.2.altup.prediction_coefs.weight'][1 * a + 3], coefs[:, 1, 3])
    np.testing.assert_array_equal(hf['layers.2.altup.correction_coefs.weight'],
                                  params['layer_2/altup/correction_coefs'].T)
    # The extra vocabulary rows are copies of the pad row, as in the released checkpoints.
    table = hf['embed_tokens.weight']
    assert table.shape[0] == config.num_embed + hf_mapping.HF_EXTRA_VOCAB
    np.testing.assert_array_equal(table[config.num_embed:], np.broadcast_to(table[0], (256, d)))


def test_untransposed_gating_layout():
    config = TransformerConfig.gemma3n(**{**_small_kwargs(), 'transpose_gating_einsum': False})
    params = _flat(random_params(config, seed=4))
    assert params['layer_0/mlp/gating_einsum'].shape == (2, config.embed_dim, config.hidden_dim)
    hf = hf_mapping.params_to_hf(hf_mapping.unflatten_params(params), config)
    np.testing.assert_array_equal(hf['layers.0.mlp.up_proj.weight'], params['layer_0/mlp/gating_einsum'][1].T)
    back, _ = hf_mapping.hf_to_params(hf.__getitem__, hf.keys(), config)
    np.testing.assert_array_equal(_flat(back)['layer_0/mlp/gating_einsum'], params['layer_0/mlp/gating_einsum'])


def _small_kwargs():
    return dict(num_layers=10, num_shared_layers=5, embed_dim=32, hidden_dim=64, num_heads=4, num_kv_heads=2,
                head_dim=16, num_embed=300, per_layer_input_dim=8, laurel_rank=4, sliding_window_size=8)


def _hub_like_checkpoint(config):
    """HF tensors as in the released checkpoints: language_model prefix, towers, k/v of shared layers."""
    prefix = 'model.language_model.'
    hf = hf_mapping.params_to_hf(random_params(config, seed=5), config, prefix=prefix)
    d, kh = config.embed_dim, config.num_kv_heads * config.head_dim
    for i in range(config.num_unshared_layers, config.num_layers):
        hf[f'{prefix}layers.{i}.self_attn.k_proj.weight'] = np.zeros((kh, d), np.float32)
        hf[f'{prefix}layers.{i}.self_attn.v_proj.weight'] = np.zeros((kh, d), np.float32)
        hf[f'{prefix}layers.{i}.self_attn.k_norm.weight'] = np.zeros((config.head_dim,), np.float32)
    hf['model.vision_tower.timm_model.conv_stem.conv.weight'] = np.zeros((4, 3, 3, 3), np.float32)
    hf['model.audio_tower.conformer.0.ffw_layer_start.ffw_layer_1.weight'] = np.zeros((8, 4), np.float32)
    hf['model.embed_vision.embedding.weight'] = np.zeros((128, d), np.float32)
    return hf, prefix


def test_hf_to_params_drops_what_we_do_not_have_and_reports_it():
    config = CONFIGS[0]
    hf, prefix = _hub_like_checkpoint(config)
    assert hf_mapping.detect_hf_prefix(hf) == prefix
    read = []
    params, dropped = hf_mapping.hf_to_params(lambda key: read.append(key) or hf[key], hf.keys(), config,
                                              prefix=prefix, dtype=ml_dtypes.bfloat16)
    num_shared = config.num_shared_layers
    assert len(dropped.kv_shared_keys) == 3 * num_shared
    assert sorted(dropped.outside_keys) == sorted(k for k in hf if not k.startswith(prefix))
    assert not set(read) & set(dropped.kv_shared_keys + dropped.outside_keys)   # never read
    assert len(read) == len(set(read))                                        # each read once
    largest = max(hf_mapping.mapping_entries(config), key=lambda e: np.prod(e.shape))
    assert read[0] == prefix + largest.hf_keys[0]                             # largest first
    summary = dropped.summary()
    assert f'{3 * num_shared} k_proj/v_proj/k_norm tensors of KV-shared layers 5-9' in summary
    assert '256 extra vocabulary rows' in summary
    assert 'model.vision_tower.* (1)' in summary and 'model.audio_tower.* (1)' in summary
    flat = _flat(params)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flat.values())
    assert 'layer_5/attn/kv_einsum/w' not in flat and 'layer_4/attn/kv_einsum/w' in flat
    assert flat['embedder/input_embedding'].shape == (config.num_embed, config.embed_dim)


def test_hf_to_params_errors_name_the_tensor():
    config = CONFIGS[0]
    hf, prefix = _hub_like_checkpoint(config)
    key = prefix + 'layers.3.mlp.down_proj.weight'

    missing = {k: v for k, v in hf.items() if k != key}
    with pytest.raises(ValueError, match=r'lacks 1 tensor.*layers\.3\.mlp\.down_proj\.weight'):
        hf_mapping.hf_to_params(missing.__getitem__, missing.keys(), config, prefix=prefix)

    wrong = dict(hf, **{key: np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match=rf'layers\.3\.mlp\.down_proj\.weight has shape \(3, 4\), expected '
                                         rf'\({config.embed_dim}, {config.hidden_dim}\).*layer_3/mlp/linear'):
        hf_mapping.hf_to_params(wrong.__getitem__, wrong.keys(), config, prefix=prefix)

    short_vocab = dict(hf, **{prefix + 'embed_tokens.weight': np.zeros((299, 32), np.float32)})
    with pytest.raises(ValueError, match=r'embed_tokens\.weight has shape \(299, 32\), expected \(>= 300, 32\)'):
        hf_mapping.hf_to_params(short_vocab.__getitem__, short_vocab.keys(), config, prefix=prefix)

    # A checkpoint with more layers than the config: the surplus layer is an error, not silently dropped.
    deeper = dict(hf, **{prefix + 'layers.10.mlp.down_proj.weight': np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match=r'does not have: model\.language_model\.layers\.10\.mlp'):
        hf_mapping.hf_to_params(deeper.__getitem__, deeper.keys(), config, prefix=prefix)

    with pytest.raises(ValueError, match='Not a Gemma 3n text checkpoint'):
        hf_mapping.detect_hf_prefix(['encoder.weight'])


def test_params_to_hf_rejects_a_tree_of_another_config():
    params = random_params(CONFIGS[0], seed=0)
    with pytest.raises(ValueError, match='missing.*layer_10'):
        hf_mapping.params_to_hf(params, CONFIGS[1])


def test_unrepresentable_configs_are_rejected():
    with pytest.raises(ValueError, match='num_kv_heads == num_heads'):
        hf_mapping.mapping_entries(TransformerConfig.gemma3n(**{**_small_kwargs(), 'num_kv_heads': 4}))
    with pytest.raises(ValueError, match='scale_plus_one=True'):
        hf_mapping.hf_text_config(TransformerConfig.gemma3n(**{**_small_kwargs(), 'scale_plus_one': True}))


@pytest.mark.parametrize('config', CONFIGS + [_e4b()], ids=lambda c: f'{c.num_layers}L{c.embed_dim}D')
def test_check_hf_config_accepts_transformers_own_serialisation(config):
    saved = transformers.Gemma3nTextConfig(**hf_mapping.hf_text_config(config)).to_dict()
    assert hf_mapping.check_hf_config(saved, config) == []
    assert hf_mapping.hf_final_logit_softcap(saved) == hf_mapping.HF_DEFAULT_FINAL_LOGIT_SOFTCAP
    multimodal = {'model_type': 'gemma3n', 'text_config': saved, 'vision_config': {}}
    assert hf_mapping.check_hf_config(multimodal, config) == []


def test_check_hf_config_reports_mismatches_by_name():
    config = CONFIGS[1]
    saved = transformers.Gemma3nTextConfig(**hf_mapping.hf_text_config(config)).to_dict()
    saved.update(hidden_size=96, num_kv_shared_layers=6, laurel_rank=8)
    saved['layer_types'] = ['full_attention'] * config.num_layers
    saved['activation_sparsity_pattern'] = [0.0] * config.num_layers
    saved['rope_parameters']['sliding_attention']['rope_theta'] = 5.0
    problems = hf_mapping.check_hf_config(saved, config)
    names = [line.split('=')[0] for line in problems]
    assert names == ['hidden_size', 'num_kv_shared_layers', 'laurel_rank', 'layer_types',
                     'activation_sparsity_pattern', 'rope_parameters[sliding_attention][rope_theta]']
    assert 'hidden_size=96, expected 64' in problems
    assert hf_mapping.check_hf_config({'model_type': 'llama'}, config) == [
            "model_type='llama', expected a Gemma 3n text config (gemma3n_text)"]


def test_check_hf_config_understands_the_hub_e4b_format():
    """The released config.json: legacy rope fields, per-layer intermediate sizes, most values explicit."""
    layer_types = ['full_attention' if (i + 1) % 5 == 0 else 'sliding_attention' for i in range(35)]
    hub = {'model_type': 'gemma3n', 'text_config': {
            'model_type': 'gemma3n_text', 'vocab_size': 262_400, 'vocab_size_per_layer_input': 262_144,
            'hidden_size': 2048, 'intermediate_size': [16_384] * 35, 'num_hidden_layers': 35,
            'num_attention_heads': 8, 'num_key_value_heads': 2, 'head_dim': 256, 'layer_types': layer_types,
            'sliding_window': 512, 'rope_theta': 1_000_000.0, 'rope_local_base_freq': 10_000.0,
            'rope_scaling': None, 'num_kv_shared_layers': 15, 'laurel_rank': 64,
            'hidden_size_per_layer_input': 256, 'final_logit_softcapping': 30.0,
            'activation_sparsity_pattern': [0.95] * 10 + [0.0] * 25}}
    assert hf_mapping.check_hf_config(hub, _e4b()) == []
    hub['text_config']['rope_theta'] = 10_000.0
    assert hf_mapping.check_hf_config(hub, _e4b()) == [
            'rope_parameters[full_attention][rope_theta]=10000.0, expected 1000000.0']
    e2b = TransformerConfig.gemma3n(num_layers=30, num_shared_layers=10, hidden_dim=8192)
    assert 'num_hidden_layers=35, expected 30' in hf_mapping.check_hf_config(hub, e2b)


def test_random_params_scales_and_fan_in():
    config = CONFIGS[1]
    flat = _flat(random_params(config, seed=7))
    assert set(flat) == {e.path for e in hf_mapping.mapping_entries(config)}
    scale = flat['layer_3/pre_ffw_norm/scale']
    assert abs(scale.mean() - 1.0) < 0.05 and 0.05 < scale.std() < 0.15
    linear = flat['layer_3/mlp/linear']    # [F, D], fan-in F
    assert abs(linear.std() * np.sqrt(config.hidden_dim) - 1.0) < 0.05
    again = _flat(random_params(config, seed=7))
    np.testing.assert_array_equal(flat['layer_3/mlp/linear'], again['layer_3/mlp/linear'])


@pytest.mark.parametrize('config', CONFIGS + [_e4b(), TransformerConfig.gemma3n(
        num_layers=30, num_shared_layers=10, hidden_dim=8192)], ids=lambda c: f'{c.num_layers}L{c.embed_dim}D')
def test_config_from_hf_inverts_hf_text_config(config):
    saved = transformers.Gemma3nTextConfig(**hf_mapping.hf_text_config(config)).to_dict()
    assert hf_mapping.config_from_hf(saved) == config
    assert hf_mapping.config_from_hf({'model_type': 'gemma3n', 'text_config': saved}) == config


def test_config_from_hf_rejects_what_our_config_cannot_express():
    config = CONFIGS[0]
    saved = transformers.Gemma3nTextConfig(**hf_mapping.hf_text_config(config)).to_dict()
    widths = [config.hidden_dim // 2] + [config.hidden_dim] * (config.num_layers - 1)
    with pytest.raises(ValueError, match=rf'Per-layer MLP widths \[{config.hidden_dim // 2}, {config.hidden_dim}\]'):
        hf_mapping.config_from_hf(dict(saved, intermediate_size=widths))
    with pytest.raises(ValueError, match=r"Unknown layer_types \['chunked_attention'\]"):
        hf_mapping.config_from_hf(dict(saved, layer_types=['chunked_attention'] * 10))
    with pytest.raises(ValueError, match='num_altup_inputs=2'):
        hf_mapping.config_from_hf(dict(saved, altup_num_inputs=2))


def test_transform_converts_each_parameter_before_the_next_is_read():
    """The loading hook that lets `gemma3n.layout.load_serving` hold one source tensor at a time."""
    config = CONFIGS[0]
    hf = hf_mapping.params_to_hf(random_params(config, seed=3), config, prefix='model.')
    events = []

    def read(key):
        events.append(('read', key))
        return hf[key]

    def transform(path, value):
        events.append(('transform', path))
        return -value

    params, _ = hf_mapping.hf_to_params(read, hf.keys(), config, prefix='model.', transform=transform)
    # Every parameter's tensors are read, then it is transformed, before the next one is read.
    pending, transformed = [], []
    for kind, name in events:
        if kind == 'read':
            pending.append(name)
            continue
        entry = next(e for e in hf_mapping.mapping_entries(config) if e.path == name)
        assert pending == ['model.' + key for key in entry.hf_keys], name
        pending = []
        transformed.append(name)
    assert not pending and sorted(transformed) == sorted(_flat(params))
    plain, _ = hf_mapping.hf_to_params(hf.__getitem__, hf.keys(), config, prefix='model.')
    for path, value in _flat(plain).items():
        np.testing.assert_array_equal(_flat(params)[path], -value)
