"""The text decoder: parameter tree, numerics against transformers, unit pieces, bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma3n import (AttentionType, Gemma3n_E2B, Gemma3n_E4B, Gemma3nTransformer,
                     KVCacheSharingConfig, QueryPreAttentionNormalisation, SigLiPFromPatches,
                     TransformerConfig, ViTModel, VisionExit)
from gemma3n.altup import AltUp
from gemma3n.attention import KVContext, QueryInfo, attention_mask
from gemma3n.ffn import gaussian_topk
from gemma3n.layers import RMSNorm, apply_rope
from hf_oracle import make_hf_causal_lm, random_params, small_configs
from reference import E4B_PARAMS_JSON, E4B_TEXT_PARAMS_JSON

E4B_TEXT_PARAMS = 6_834_711_280
E4B_ARRAYS, E4B_PARAMS = 1_190, 7_253_937_760         # Gemma3n_E4B() with its vision encoder
# float32 parity bound. Both implementations compute the same float32 graph in a different
# order; rounding (~1e-7 relative) is amplified along 10-15 layers of norms (every RMSNorm
# divides by a data-dependent RMS) to ~2e-5..6e-5 on logits of magnitude 1-10 (measured),
# so 1e-4 leaves ~2x headroom while any real mistake (a wrong rule, a missing norm, an
# off-by-one window) shows up as differences of 1e-2 or more.
F32_LOGIT_TOL = 1e-4


def flat_shapes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join(k.key for k in path): (list(v.shape), str(v.dtype)) for path, v in leaves}


def init_shapes(model):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))['params']


def test_e4b_text_only_param_tree_equals_reference():
    ours = flat_shapes(init_shapes(Gemma3n_E4B(text_only=True)))
    ref = json.loads(E4B_TEXT_PARAMS_JSON.read_text())
    ref = {k: (v['shape'], v['dtype']) for k, v in ref.items()}
    assert ours == ref
    assert len(ours) == 751
    assert sum(int(np.prod(s)) for s, _ in ours.values()) == E4B_TEXT_PARAMS


def test_e4b_param_tree_equals_reference_with_the_seed_vision_config():
    # The vision encoder spelled as the seed spells it, from the package's own names.
    seed_vision = SigLiPFromPatches(
        siglip_encoder=ViTModel(patch_size=(14, 14), width=1152, depth=27, mlp_dim=4304,
                                num_heads=16, posemb='learn', dropout=0.0),
        siglip_exit=VisionExit(output_length=256), num_mm_tokens_per_image_prepool=4096,
        num_mm_tokens_per_image=256, image_height=896, image_width=896, image_channels=3,
        apply_stop_gradient=True)
    ref = {k: (v['shape'], v['dtype']) for k, v in json.loads(E4B_PARAMS_JSON.read_text()).items()}
    assert len(ref) == E4B_ARRAYS
    assert sum(int(np.prod(s)) for s, _ in ref.values()) == E4B_PARAMS
    seed_model = Gemma3nTransformer(config=dataclasses.replace(Gemma3n_E4B().config,
                                                               vision_encoder=seed_vision))
    for model in (Gemma3n_E4B(), seed_model):
        assert flat_shapes(init_shapes(model)) == ref


def expected_text_params(cfg: TransformerConfig) -> int:
    """Parameter count written out from the reference's shape list (docs/architecture.md), independent of the module code."""
    d, f, n, k, h, p, r = (cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.per_layer_input_dim, cfg.laurel_rank)
    a, layers, v = cfg.num_altup_inputs, cfg.num_layers, cfg.num_embed
    per_layer = (n * d * h * 2 + h                      # q, attn_vec, query_norm
                 + 3 * f * d                            # gating (2) + linear
                 + 2 * d * r                            # laurel
                 + 4 * d + 4 * a * a + 4 * a + d + d    # router, coefs, output scale, router norm
                 + 2 * d * p + d                        # per-layer gate, projection, norm
                 + 5 * d)                               # five block norms
    owners = cfg.num_unshared_layers
    kv = owners * (2 * k * d * h + h)
    top = v * d + v * layers * p + d * layers * p + p + 2 * (a - 1) * d * d + d
    return layers * per_layer + kv + top


def test_param_counts_e4b_e2b():
    for model in (Gemma3n_E4B(text_only=True), Gemma3n_E2B(text_only=True)):
        count = sum(x.size for x in jax.tree.leaves(init_shapes(model)))
        assert count == expected_text_params(model.config)
    e2b = init_shapes(Gemma3n_E2B(text_only=True))
    assert sum(x.size for x in jax.tree.leaves(e2b)) == 4_434_658_400
    assert 'kv_einsum' not in e2b['layer_20']['attn'] and 'kv_einsum' in e2b['layer_19']['attn']


def test_e4b_config_values():
    cfg = Gemma3n_E4B().config
    assert cfg.sliding_window_size == 512 and cfg.num_layers == 35
    assert cfg.activation_sparsity_pattern == (0.95,) * 10 + (0.0,) * 25
    assert cfg.kv_cache_sharing_config == KVCacheSharingConfig(
        frac_shared_layers=0.42857142857142855, share_global=True, share_local=True)
    assert cfg.attention_types[:5] == (AttentionType.LOCAL_SLIDING,) * 4 + (AttentionType.GLOBAL,)
    assert (cfg.num_embed, cfg.embed_dim, cfg.hidden_dim, cfg.head_dim) == (262144, 2048, 16384, 256)
    assert Gemma3n_E4B.INFO.tokenizer_version == '3n'
    assert Gemma3n_E2B().config.num_layers == 30 and Gemma3n_E2B().config.hidden_dim == 8192


def test_query_pre_attn_scalar_of_every_member_is_the_reference_formula():
    # The reference's `TransformerConfig.query_pre_attn_scalar()`, written out per member. Widths
    # are chosen so that every formula gives a different number and embed_dim / num_heads is not
    # whole (the reference divides with //).
    cfg = dataclasses.replace(small_configs()[0], embed_dim=70, num_heads=4, num_kv_heads=2,
                              head_dim=9)
    reference = {
        QueryPreAttentionNormalisation.NONE: 1.0,
        QueryPreAttentionNormalisation.BY_EMBED_DIM_DIV_NUM_HEADS: 70 // 4,
        QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS: (70 // 4) ** -0.5,
        QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM: 9 ** -0.5,
    }
    assert reference.keys() == set(QueryPreAttentionNormalisation)
    assert len(set(reference.values())) == len(reference)
    for member, expected in reference.items():
        assert dataclasses.replace(cfg, query_pre_attn_norm=member).query_pre_attn_scalar() == expected


def test_e4b_kv_sharing_sources():
    sources = Gemma3n_E4B().config.kv_source_layers()
    types = Gemma3n_E4B().config.attention_types
    assert sources[:20] == tuple(range(20))
    for i in range(20, 35):
        assert sources[i] == (19 if types[i] == AttentionType.GLOBAL else 18)


# ---- parity with transformers ----------------------------------------------------------------

def jit_logits(model, params, tokens, **kwargs):
    fn = jax.jit(lambda p, t: model.apply({'params': p}, t, **kwargs).logits)
    return np.asarray(fn(params, tokens))


def hf_logits(hf, tokens, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {'attention_mask': torch.tensor(mask.astype(np.int64))}
        return hf(torch.tensor(tokens), **kwargs).logits.numpy()


@pytest.fixture(scope='module', params=range(3), ids=lambda i: f'config{i}')
def parity_case(request):
    cfg = small_configs()[request.param]
    params = random_params(cfg, seed=request.param)
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    return cfg, params, model, make_hf_causal_lm(cfg, params)


def test_logits_match_transformers(parity_case):
    cfg, params, model, hf = parity_case
    # 24 tokens: three times the sliding window of 8.
    tokens = np.random.default_rng(0).integers(1, cfg.num_embed, (2, 24))
    ours = jit_logits(model, params, tokens)
    theirs = hf_logits(hf, tokens)
    assert 1.0 < np.abs(theirs).max() < 20.0
    np.testing.assert_allclose(ours, theirs, atol=F32_LOGIT_TOL, rtol=0)


def test_right_padded_batch_and_last_only_match_transformers(parity_case):
    cfg, params, model, hf = parity_case
    rng = np.random.default_rng(1)
    lengths = [20, 13]
    tokens = np.zeros((2, 20), np.int64)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(1, cfg.num_embed, n)
    ours = jit_logits(model, params, tokens)
    last = jit_logits(model, params, tokens, return_last_only=True)
    for b, n in enumerate(lengths):
        theirs = hf_logits(hf, tokens[b:b + 1, :n])[0]
        np.testing.assert_allclose(ours[b, :n], theirs, atol=F32_LOGIT_TOL, rtol=0)
        np.testing.assert_allclose(last[b], theirs[-1], atol=F32_LOGIT_TOL, rtol=0)


def test_bfloat16_stays_close_to_float32():
    cfg = small_configs()[0]
    params = random_params(cfg, seed=0)
    tokens = np.random.default_rng(2).integers(1, cfg.num_embed, (2, 24))
    f32 = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    bf16 = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.bfloat16)
    ref = jit_logits(f32, params, tokens)
    low = jit_logits(bf16, jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params), tokens)
    # Measured on the three small configs: max 0.96-1.45, mean 0.064-0.092 on logits up to ~5
    # (bf16 keeps 8 mantissa bits, ~0.4% per rounding, over hundreds of roundings in sequence);
    # docs/architecture.md §8: ~0.9 max / 0.075 mean for the reference and for transformers.
    diff = np.abs(low - ref)
    assert diff.mean() < 0.12
    assert diff.max() < 2.0
    assert (low.argmax(-1) == ref.argmax(-1)).mean() > 0.75


def test_fresh_init_gives_varied_logits():
    cfg = small_configs()[0]
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    tokens = np.arange(1, 13)[None]
    params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
    logits = jit_logits(model, params, tokens)
    assert 0.3 < logits.std() < 10
    assert len(set(logits[0].argmax(-1).tolist())) > 3


def test_batch_dims_and_hidden_states():
    cfg = small_configs()[0]
    params = random_params(cfg, seed=0)
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    tokens = np.random.default_rng(3).integers(1, cfg.num_embed, (2, 3, 7))
    out = model.apply({'params': params}, tokens, return_hidden_states=True)
    flat = model.apply({'params': params}, tokens.reshape(6, 7))
    assert out.logits.shape == (2, 3, 7, cfg.num_embed)
    assert out.hidden_states.shape == (2, 3, 7, cfg.embed_dim)
    np.testing.assert_allclose(out.logits.reshape(6, 7, -1), flat.logits, atol=1e-5)
    assert out.cache is None


def test_explicit_positions_and_mask_equal_defaults():
    cfg = small_configs()[0]
    params = random_params(cfg, seed=0)
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    tokens = np.random.default_rng(4).integers(1, cfg.num_embed, (1, 12))
    default = model.apply({'params': params}, tokens).logits
    causal = np.tril(np.ones((12, 12), bool))[None]
    explicit = model.apply({'params': params}, tokens, positions=np.arange(12)[None],
                           attention_mask=causal).logits
    np.testing.assert_allclose(default, explicit, atol=1e-5)
    shifted = model.apply({'params': params}, tokens, positions_offset=np.array([3])).logits
    explicit_shift = model.apply({'params': params}, tokens, positions=np.arange(3, 15)[None]).logits
    np.testing.assert_allclose(shifted, explicit_shift, atol=1e-5)
    # RoPE sees relative positions only: a gap (not a shift) changes the logits.
    gap = model.apply({'params': params}, tokens,
                      positions=np.concatenate([np.arange(6), np.arange(10, 16)])[None]).logits
    assert np.abs(np.asarray(gap) - np.asarray(default))[0, 6:].max() > 1e-2


# ---- unit pieces ---------------------------------------------------------------------------

def test_rms_norm_variants():
    x = jnp.array([[3.0, 4.0]])                     # rms = sqrt(12.5)
    normed = np.array([[3.0, 4.0]]) / np.sqrt(12.5 + 1e-6)
    scale = jnp.array([2.0, -1.0])
    plain = RMSNorm(scale_plus_one=False).apply({'params': {'scale': scale}}, x)
    plus_one = RMSNorm(scale_plus_one=True).apply({'params': {'scale': scale}}, x)
    no_scale = RMSNorm(with_scale=False).apply({}, x)
    np.testing.assert_allclose(plain, normed * [2.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(plus_one, normed * [3.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(no_scale, normed, rtol=1e-6)


def test_rope_rotates_half_split_pairs():
    x = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0).at[..., 3].set(2.0)   # pairs (0,2), (1,3)
    out = np.asarray(apply_rope(x, jnp.array([[3]]), base_frequency=100.0))[0, 0, 0]
    # pair 0: timescale 1 -> angle 3; pair 1: timescale 100^(2/4) = 10 -> angle 0.3
    np.testing.assert_allclose(out, [np.cos(3), -2 * np.sin(0.3), np.sin(3), 2 * np.cos(0.3)],
                               rtol=1e-6)
    scaled = apply_rope(x, jnp.array([[6]]), base_frequency=100.0, scale_factor=2.0)
    np.testing.assert_allclose(scaled[0, 0, 0], out, rtol=1e-6)


def test_gaussian_topk_keeps_about_five_percent():
    gate = jax.random.normal(jax.random.key(0), (4, 16384))
    kept = np.asarray(gaussian_topk(gate, 0.95) > 0).mean()
    assert 0.045 < kept < 0.055
    row = np.asarray(gate[0])
    cutoff = row.mean() + row.std() * 1.6448536
    np.testing.assert_allclose(gaussian_topk(gate, 0.95)[0], np.maximum(row - cutoff, 0), atol=1e-5)


def test_sliding_window_mask_boundaries():
    positions = jnp.arange(12)[None]
    query = QueryInfo(positions=positions, visible_until=positions, valid=jnp.ones((1, 12), bool))
    context = KVContext(None, None, positions, jnp.ones((1, 12), bool))
    local = np.asarray(attention_mask(query, context, AttentionType.LOCAL_SLIDING, 4))[0]
    glob = np.asarray(attention_mask(query, context, AttentionType.GLOBAL, 4))[0]
    assert local[7].tolist() == [j in (4, 5, 6, 7) for j in range(12)]   # 4 keys, self included
    assert glob[7].tolist() == [j <= 7 for j in range(12)]


def test_altup_predict_correct_by_hand():
    altup = AltUp(features=2, num_inputs=2)
    streams = jnp.array([[[[1.0, 2.0]]], [[[3.0, -1.0]]]])              # [A=2, B=1, L=1, D=2]
    params = altup.init(jax.random.key(0), streams, method=AltUp.predict)['params']
    params = dict(params)
    params['modality_router'] = {'w': jnp.ones((2, 4))}
    params['router_norm_layer'] = {'scale': jnp.ones(2)}
    pred_coefs = np.zeros((4, 2, 2), np.float32)
    pred_coefs[0] = [[0.5, 0.0], [1.0, -1.0]]
    params['prediction_coefs'] = jnp.asarray(pred_coefs)
    corr_coefs = np.zeros((4, 2), np.float32)
    corr_coefs[0] = [1.0, 2.0]
    params['correction_coefs'] = jnp.asarray(corr_coefs)
    # router: rms_norm([1, 2]) / D summed over D, tanh -> r (same for every modality)
    normed = np.array([1.0, 2.0]) / np.sqrt(2.5 + 1e-6)
    r = np.tanh(normed.sum() / 2)
    pred = np.asarray(altup.apply({'params': params}, streams, method=AltUp.predict))
    s0, s1 = np.array([1.0, 2.0]), np.array([3.0, -1.0])
    np.testing.assert_allclose(pred[0, 0, 0], s0 + r * 0.5 * s0, rtol=1e-5)
    np.testing.assert_allclose(pred[1, 0, 0], s1 + r * (s0 - s1), rtol=1e-5)
    activated = jnp.array([[[0.0, 1.0]]])
    corrected = np.asarray(altup.apply({'params': params}, jnp.asarray(pred), activated,
                                       method=AltUp.correct))
    r2 = np.tanh((np.array([0.0, 1.0]) / np.sqrt(0.5 + 1e-6)).sum() / 2)
    innovation = np.array([0.0, 1.0]) - pred[0, 0, 0]
    np.testing.assert_allclose(corrected[0, 0, 0], pred[0, 0, 0] + (r2 * 1 + 1) * innovation, rtol=1e-5)
    np.testing.assert_allclose(corrected[1, 0, 0], pred[1, 0, 0] + (r2 * 2 + 1) * innovation, rtol=1e-5)



@pytest.mark.parametrize('tokens', [3, 40])     # mixed by broadcast sums / by a matrix product
def test_altup_predict_mixes_the_streams_as_numpy_does(tokens):
    altup = AltUp(features=8, num_inputs=4, coef_clip=0.5)
    rng = np.random.default_rng(tokens)
    streams = jnp.asarray(rng.normal(size=(4, 2, tokens, 8)), jnp.float32)
    params = dict(altup.init(jax.random.key(0), streams, method=AltUp.predict)['params'])
    params['prediction_coefs'] = jnp.asarray(rng.normal(size=(4, 4, 4)), jnp.float32)
    route = np.asarray(altup.apply({'params': params}, streams[0],
                                   method=lambda m, x: m.route(x)), np.float64)
    coefs = np.einsum('btm,mij->btij', route,
                      np.clip(np.asarray(params['prediction_coefs'], np.float64), -0.5, 0.5))
    s = np.asarray(streams, np.float64)
    expected = s + np.einsum('btij,jbtd->ibtd', coefs, s)
    pred = np.asarray(altup.apply({'params': params}, streams, method=AltUp.predict))
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-5)

# ---- bad input -----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny():
    cfg = small_configs()[0]
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    return model, random_params(cfg, seed=0)


@pytest.mark.parametrize('tokens, message', [
    (np.ones((1, 4), np.float32), 'integer'),
    (np.array(5), 'shape'),
    (np.array([[1, 2, 300]]), 'outside the vocabulary'),
    (np.array([[1, -1]]), 'outside the vocabulary'),
    ([[1, 2 ** 32 + 1]], r'token id 4294967297 \(at index \(0, 1\)\)'),   # no int32 wrap to 1
    (np.zeros((1, 0), np.int32), 'at least one'),
])
def test_bad_tokens_raise(tiny, tokens, message):
    model, params = tiny
    # A float array is a TypeError, bad values and shapes ValueErrors; `match` tells them apart.
    with pytest.raises((TypeError, ValueError), match=message):
        model.apply({'params': params}, tokens)


def test_images_on_text_only_model_raise(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match='does not have vision encoder'):
        model.apply({'params': params}, np.ones((1, 3), np.int32),
                    images=np.zeros((1, 32, 32, 3), np.uint8))


def test_bad_config_raises():
    with pytest.raises(ValueError, match='activation_sparsity_pattern'):
        dataclasses.replace(small_configs()[0], activation_sparsity_pattern=(0.0,))
    with pytest.raises(ValueError, match='multiple'):
        dataclasses.replace(small_configs()[0], num_kv_heads=3)
