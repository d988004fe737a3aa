"""Sparse FFN rows in decode (gemma3n/sparse_rows.py): the layers with activation sparsity read
only the kept units' rows and give the dense computation's numbers, for every leaf type."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n import Gemma3nTransformer, sparse_rows
from gemma3n.ffn import FeedForward, gaussian_topk
from gemma3n.layers import (Int4Weight, QuantizedWeight, ServingWeight, StackedWeight,
                            decode_kernels)
from gemma3n import layout
from gemma3n.layers import int4
from gemma3n.layers.lora import LoRAWeight
from gemma3n.layout import to_serving
from hf_oracle import random_params, small_configs

F32_EPS = 2.0 ** -24
BF16_EPS = 2.0 ** -8
LAYER = 'layer_0'
TOKENS = 3          # decode rows: 3 sequences, one token each


@pytest.fixture(scope='module')
def model_and_params():
    cfg = small_configs()[0]                  # embed 32, hidden 1024, layers 0-2 sparse
    return Gemma3nTransformer(config=cfg, text_only=True), random_params(cfg, seed=0)


def _ffn(model) -> FeedForward:
    cfg = model.config
    return FeedForward(features=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
                       transpose_gating_einsum=cfg.transpose_gating_einsum,
                       sparsity=cfg.sparsity(0))


@pytest.fixture(autouse=True)
def quantize_small_weights(monkeypatch):
    # The FFN weights here hold 32768 values: quantized too.
    monkeypatch.setattr(layout, 'MIN_QUANTIZED_SIZE', 4096)


def _layouts(model, params, fmt: str):
    """(sparse rows layout, plain serving layout) of layer 0's FFN weights in `fmt`."""
    cast = {'float32': jnp.float32, 'bf16': jnp.bfloat16}.get(fmt, jnp.float32)
    params = jax.tree.map(lambda a: np.asarray(a, cast), params)
    kw = {'quantize_int8': fmt == 'int8', 'quantize_int4': fmt == 'int4'}
    trees = [to_serving(model, params, sparse_rows=rows, **kw)[1] for rows in (True, False)]
    return [tree[LAYER]['mlp'] for tree in trees], cast


@pytest.mark.parametrize('fmt,tokens', [('float32', TOKENS), ('bf16', TOKENS), ('int8', TOKENS),
                                        ('int4', TOKENS), ('bf16', 1), ('bf16', 16)])
def test_sparse_rows_equal_dense(model_and_params, fmt, tokens, monkeypatch):
    model, params = model_and_params
    # int4's prefill products round the dequantized weights to bfloat16 (tested in
    # test_int4.py); here they are compared exact, in float32.
    monkeypatch.setattr(int4, 'PREFILL_DTYPE', jnp.float32)
    (rows_params, dense_params), dtype = _layouts(model, params, fmt)
    leaf_type = {'int8': QuantizedWeight, 'int4': Int4Weight}.get(fmt, ServingWeight)
    assert isinstance(rows_params['gating_einsum'], StackedWeight)
    assert all(isinstance(leaf, leaf_type) for leaf in rows_params['gating_einsum'].parts)
    # int4 keeps the rows-first down projection in int8 (gemma3n/layout.py says why).
    down_type = QuantizedWeight if fmt == 'int4' else leaf_type
    assert isinstance(rows_params['linear'], down_type)
    ffn = _ffn(model)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((tokens, 1, model.config.embed_dim)),
                    dtype)
    apply = jax.jit(lambda p, x: ffn.apply({'params': p}, x))
    lowered = apply.lower(rows_params, x).as_text()
    assert 'gather' in lowered                         # the rows path, not the dense one
    if fmt == 'bf16' and decode_kernels.enabled():
        # The kept units of all tokens, read in place by the gathered-rows kernels.
        assert decode_kernels.TARGETS['bf16_gathered'] in lowered
        assert decode_kernels.TARGETS['bf16_rows'] in lowered
    if fmt == 'int8' and decode_kernels.enabled():
        # The gathered up rows go through our decode kernel (the gate too).
        assert lowered.count(decode_kernels.TARGETS[fmt]) >= 2
    if fmt in ('int8', 'int4') and decode_kernels.enabled():
        # The int8 down projection's kept rows are read in place.
        assert decode_kernels.TARGETS['int8_rows'] in lowered
    got = np.asarray(apply(rows_params, x), np.float32)
    want = np.asarray(apply(dense_params, x), np.float32)
    # The same weights as a prefill reads them (many tokens: the dense product of the rows
    # layout) give the same numbers too.
    prefill = np.asarray(apply(rows_params, jnp.tile(x, (1, decode_kernels.MAX_ROWS + 1, 1))),
                         np.float32)[:, :1]
    if fmt == 'int4':
        # The rows layout's down projection is int8, the [D, F] layout's int4: other weights,
        # so the reference is the dense product of these same weights.
        want = prefill
    # The kept units' terms are the dense ones. Float formats and int4 (exact products in
    # float32): only the float32 summation order differs. int8: gate and up are bit for bit
    # the dense ones (int32 sums); gelu · up, fused differently in each program, may differ
    # by a float32 ulp and move the hidden vector's int8 rounding by a step (measured: 4.5e-8
    # on outputs of 0.14). Bound: 2·K·2⁻²⁴·4·max|y|, K = 1024 units (4: a bound on
    # Σ|h·w| / max|y| here), plus for bf16 one rounding of the output (2⁻⁸ relative).
    magnitude = np.max(np.abs(want)) + 1e-30
    bound = 2 * model.config.hidden_dim * F32_EPS * 4 * magnitude
    if fmt == 'bf16':
        bound += BF16_EPS * magnitude
    assert np.max(np.abs(got - want)) <= bound
    assert np.max(np.abs(prefill - want)) <= bound


def test_kept_units_are_exactly_the_nonzero_activations():
    rng = np.random.default_rng(2)
    gate = jnp.asarray(rng.standard_normal((4, 1024)), jnp.float32)
    top = gaussian_topk(gate, 0.95)
    size = sparse_rows.capacity(1024, 0.95)
    ids, counts = decode_kernels.kept_ids(top, size)
    for row in range(4):
        want = np.flatnonzero(np.asarray(top[row]))
        assert 0 < len(want) < size                    # rows keep different numbers of units
        assert counts[row] == len(want)
        np.testing.assert_array_equal(np.asarray(ids[row])[:len(want)], want)


def test_capacity_exceeded_falls_back_to_dense(model_and_params, monkeypatch):
    model, params = model_and_params
    (rows_params, dense_params), _ = _layouts(model, params, 'int8')
    # Room for 6 rows per token where ~51 are kept: every step takes the dense branch.
    monkeypatch.setattr(sparse_rows, 'CAPACITY_FACTOR', 0.12)
    ffn = _ffn(model)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 1, model.config.embed_dim)),
                    jnp.float32)
    got = np.asarray(jax.jit(lambda p: ffn.apply({'params': p}, x))(rows_params))
    want = np.asarray(jax.jit(lambda p: ffn.apply({'params': p}, x))(dense_params))
    # The bound of the test above; 6 rows of ~51 would be off by a large part of the output.
    bound = 2 * model.config.hidden_dim * F32_EPS * 4 * np.max(np.abs(want))
    assert np.max(np.abs(got - want)) <= bound


def test_layout_stores_sparse_layers_rows_first(model_and_params):
    model, params = model_and_params
    _, tree = to_serving(model, params, quantize_int8=True)
    f, d = model.config.hidden_dim, model.config.embed_dim
    down = tree[LAYER]['mlp']['linear']
    assert isinstance(down, QuantizedWeight) and down.q.shape == (f, d) and down.scale_last
    # A layer without sparsity keeps the serving order [D, F] and its stacked gating.
    dense_layer = f'layer_{model.config.num_layers - 1}'
    assert model.config.sparsity(model.config.num_layers - 1) == 0.0
    assert tree[dense_layer]['mlp']['linear'].q.shape == (d, f)
    assert not isinstance(tree[dense_layer]['mlp']['gating_einsum'], StackedWeight)


def test_lora_wrapped_down_projection_takes_the_dense_products(model_and_params):
    model, params = model_and_params
    (rows_params, dense_params), _ = _layouts(model, params, 'float32')
    f, d = model.config.hidden_dim, model.config.embed_dim
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.standard_normal((f, 2)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((2, d)), jnp.float32)
    ffn = _ffn(model)
    x = jnp.asarray(rng.standard_normal((2, 1, d)), jnp.float32)
    outs = []
    for tree in (rows_params, dense_params):
        wrapped = dict(tree, linear=LoRAWeight(tree['linear'], a, b, 0.5, (0,), 0))
        outs.append(np.asarray(jax.jit(lambda p: ffn.apply({'params': p}, x))(wrapped)))
    bound = 2 * f * F32_EPS * 4 * np.max(np.abs(outs[1]))
    assert np.max(np.abs(outs[0] - outs[1])) <= bound


def test_gating_stored_d_first_reads_rows_too(model_and_params):
    # A checkpoint whose gating is [2, D, F] (transpose_gating_einsum False): the parts are
    # [F, D] in serving order all the same.
    model, _ = model_and_params
    cfg = dataclasses.replace(model.config, transpose_gating_einsum=False)
    model = Gemma3nTransformer(config=cfg, text_only=True)
    (rows_params, dense_params), _ = _layouts(model, random_params(cfg, seed=0), 'float32')
    ffn = _ffn(model)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 1, cfg.embed_dim)), jnp.float32)
    apply = jax.jit(lambda p: ffn.apply({'params': p}, x))
    assert 'gather' in apply.lower(rows_params).as_text()
    got, want = np.asarray(apply(rows_params)), np.asarray(apply(dense_params))
    assert np.max(np.abs(got - want)) <= 2 * cfg.hidden_dim * F32_EPS * 4 * np.max(np.abs(want))
