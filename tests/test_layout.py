"""Inference layouts: [out, in] weights, int8 weights and the host-side per-layer table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n import Gemma3n_E4B, Gemma3nTransformer, Sampler, load_params, save_params
from gemma3n.checkpoints import open_per_layer_table
from gemma3n.layers import QuantizedWeight, ServingWeight, contract, lookup, serving_order
from gemma3n.layers.einsum import TOKENS_FIRST_ROWS
from gemma3n import layout
from gemma3n.embedder import split_per_layer_table
from gemma3n.layers import int4, int8
from gemma3n.layout import load_serving, quantize, to_serving
from gemma3n.schema import model_schema
from hf_oracle import random_params, small_configs

# Same float32 bound and reason as tests/test_model.py: only the summation order changes.
F32_LOGIT_TOL = 1e-4
F32_SUM_TOL = 3e-5    # one float32 product's summation order, below


@pytest.fixture(scope='module')
def ref():
    cfg = small_configs()[0]
    params = random_params(cfg, seed=0)
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    tokens = np.random.default_rng(5).integers(1, cfg.num_embed, (2, 24))
    logits = np.asarray(jax.jit(model.apply)({'params': params}, tokens).logits)
    return model, params, tokens, logits


def test_serving_layout_shapes_for_e4b():
    schema = model_schema(Gemma3n_E4B(text_only=True))

    def stored(path):
        info = schema[path]
        return tuple(info.shape[i] for i in info.serving_order)

    assert stored('layer_0/attn/q_einsum/w') == (8, 256, 2048)            # [N, H, D]
    assert stored('layer_0/attn/kv_einsum/w') == (2, 2, 256, 2048)
    assert stored('layer_0/attn/attn_vec_einsum/w') == (2048, 8, 256)     # [D, N, H]
    assert stored('layer_0/mlp/linear') == (2048, 16384)
    assert stored('layer_0/mlp/gating_einsum') == (2, 16384, 2048)        # already [out, in]
    assert stored('embedder/per_layer_input_projection/w') == (35, 256, 2048)
    assert not schema['layer_0/altup/prediction_coefs'].is_projection     # stays as it is


def test_serving_layout_gives_the_same_logits(ref):
    model, params, tokens, logits = ref
    serving_model, serving_params = to_serving(model, params)
    linear = serving_params['layer_3']['mlp']['linear']
    assert isinstance(linear, ServingWeight) and linear.order == (1, 0)
    assert linear.value.shape == linear.shape[::-1] == params['layer_3']['mlp']['linear'].shape[::-1]
    out = np.asarray(jax.jit(serving_model.apply)({'params': serving_params}, tokens).logits)
    np.testing.assert_allclose(out, logits, atol=F32_LOGIT_TOL, rtol=0)
    with pytest.raises(ValueError, match='already'):
        to_serving(serving_model, serving_params)


def test_quantize_round_trip_by_hand():
    w = jnp.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])          # [out=2, in=3]
    q = quantize(w, 1)
    np.testing.assert_allclose(q.scale, [2.0 / 127, 1.0])
    assert q.q.dtype == jnp.int8 and q.q[0].tolist() == [64, -127, 32]


def test_int8_stays_close(ref):
    model, params, tokens, logits = ref
    qmodel, qparams = to_serving(model, params, quantize_int8=True)
    assert isinstance(qparams['layer_3']['mlp']['gating_einsum'], QuantizedWeight)
    assert not isinstance(qparams['layer_0']['laurel']['linear_left']['w'], QuantizedWeight)
    out = np.asarray(jax.jit(qmodel.apply)({'params': qparams}, tokens).logits)
    diff = np.abs(out - logits)
    # Measured: mean 0.041, max 0.48 on logits up to ~4 (weights and activation rows both in
    # int8 steps of 1/127 of their absmax); a broken scale or axis gives errors of order 1.
    assert diff.mean() < 0.06 and diff.max() < 1.0
    assert (out.argmax(-1) == logits.argmax(-1)).mean() > 0.8


def test_host_per_layer_table_changes_nothing(ref):
    model, params, _, _ = ref
    prompts = [[2, 3, 4], [5, 6]]
    plain = Sampler(model=model, params=params, cache_length=64)
    host = Sampler(model=model, params=params, cache_length=64, per_layer_table_on_host=True)
    assert 'per_layer_input_embedding' not in host.params['embedder']
    a = plain.sample_tokens(prompts, 12, return_logits=True)
    b = host.sample_tokens(prompts, 12, return_logits=True)
    assert (a.tokens == b.tokens).all()
    np.testing.assert_allclose(a.logits, b.logits, atol=F32_LOGIT_TOL, rtol=0)
    serving_model, serving_params = to_serving(model, params)
    c = Sampler(model=serving_model, params=serving_params, cache_length=64,
                per_layer_table_on_host=True).sample_tokens(prompts, 12)
    assert (a.tokens == c.tokens).all()


def test_sampler_reads_the_per_layer_table_lazily_from_the_checkpoint(ref, tmp_path):
    model, params, _, _ = ref
    save_params(params, tmp_path / 'model.safetensors')
    lean = load_params(tmp_path / 'model.safetensors', model=model, skip_per_layer_table=True)
    assert 'per_layer_input_embedding' not in lean['embedder']
    with open_per_layer_table(tmp_path / 'model.safetensors', model=model,
                              dtype=np.float32) as table:
        lazy = Sampler(model=model, params=lean, cache_length=64, per_layer_table=table)
        out = lazy.sample_tokens([[2, 3, 4], [5, 6]], 10)
    plain = Sampler(model=model, params=params, cache_length=64).sample_tokens([[2, 3, 4], [5, 6]], 10)
    assert (out.tokens == plain.tokens).all()
    with pytest.raises(ValueError, match='skip_per_layer_table'):
        Sampler(model=model, params=params, per_layer_table=table)


@pytest.mark.parametrize('quantize_int8', [False, True], ids=['bf16', 'int8'])
def test_load_serving_converts_while_loading_as_to_serving_does(ref, tmp_path, quantize_int8):
    model, params, tokens, _ = ref
    save_params(params, tmp_path / 'model.safetensors')
    loaded_model, loaded = load_serving(tmp_path / 'model.safetensors', model, progress=False,
                                        quantize_int8=quantize_int8)
    expected_model, expected = to_serving(model, params, quantize_int8=quantize_int8)
    assert loaded_model is model
    flat_loaded = jax.tree_util.tree_leaves_with_path(loaded)
    flat_expected = jax.tree_util.tree_leaves_with_path(expected)
    assert [p for p, _ in flat_loaded] == [p for p, _ in flat_expected]
    for (path, a), (_, b) in zip(flat_loaded, flat_expected):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(a, b, err_msg=str(path))
    np.testing.assert_array_equal(jax.jit(loaded_model.apply)({'params': loaded}, tokens).logits,
                                  jax.jit(expected_model.apply)({'params': expected}, tokens).logits)


def test_int8_tied_embedding(ref):
    # The small test model's embedding is below the size worth quantizing, so it is quantized
    # here by hand: gathered rows times their scale on the input side, an int8 x int8 product
    # for the logits.
    model, params, tokens, logits = ref
    qmodel, qparams = to_serving(model, params)
    table = quantize(params['embedder']['input_embedding'], 1)
    qparams['embedder']['input_embedding'] = table
    rows = qmodel.apply({'params': qparams}, tokens[:, :3], method=lambda m, t: m.embedder.encode(t))
    dequantized = np.asarray(table.q, np.float32)[tokens[:, :3]] * np.asarray(table.scale)[tokens[:, :3], None]
    np.testing.assert_allclose(rows, dequantized * np.sqrt(model.config.embed_dim), rtol=1e-6)
    out = np.asarray(jax.jit(qmodel.apply)({'params': qparams}, tokens).logits)
    diff = np.abs(out - logits)
    # Measured: mean 0.054, max 0.75 on logits up to ~4.3: rows of only 32 values quantized in
    # steps of 1/127 of their absmax, on both the input and the output side; a broken scale or
    # axis gives mean errors of order 1.
    assert diff.mean() < 0.08 and diff.max() < 1.0
    assert (out.argmax(-1) == logits.argmax(-1)).mean() > 0.8


def test_int8_conversion_in_chunks_equals_one_piece(ref, monkeypatch):
    # Large weights are quantized a chunk of output channels at a time (bounded temporaries);
    # a chunk of a few rows must give exactly what quantizing the whole weight gives.
    model, params, _, _ = ref
    path = 'layer_3/mlp/gating_einsum'
    info = model_schema(model)[path]
    weight = params['layer_3']['mlp']['gating_einsum']
    whole = quantize(jnp.transpose(weight, info.serving_order), weight.ndim - len(info.in_axes))
    monkeypatch.setattr(int8, 'QUANTIZE_CHUNK', 3 * weight.shape[-1] + 1)     # 3 rows, ragged end
    chunked = layout.ServingConverter(model, quantize_int8=True)(path, weight)
    np.testing.assert_array_equal(chunked.q, whole.q)
    np.testing.assert_array_equal(chunked.scale, whole.scale)


@pytest.mark.parametrize('quantize_int8', [False, True], ids=['bf16', 'int8'])
def test_serving_nbytes_counts_what_a_serving_load_holds(ref, quantize_int8):
    model, params, _, _ = ref
    lean, table = split_per_layer_table(params)
    as_bf16 = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), lean)
    _, converted = to_serving(model, as_bf16, quantize_int8=quantize_int8)
    held = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(converted))
    assert layout.serving_nbytes(model, jnp.bfloat16, quantize_int8=quantize_int8) == held
    assert layout.serving_nbytes(model, jnp.bfloat16, quantize_int8=quantize_int8,
                                 per_layer_table=True) == held + table.size * 2


# (eqn in checkpoint order, weight shape, in_axes, out_axes): the model's projection forms.
CONTRACTIONS = [
    ('BTD,NDH->BTNH', (4, 32, 16), (1,), (2,)),            # queries
    ('BSD,CKDH->CBSKH', (2, 2, 32, 16), (2,), (3,)),       # stacked K and V
    ('BTNH,NHD->BTD', (4, 16, 32), (0, 1), (2,)),          # attention output: two input axes
    ('BTD,DNP->BTNP', (32, 3, 8), (0,), (1, 2)),           # per-layer projection: two outputs
    ('BTD,CFD->CBTF', (2, 64, 32), (2,), (1,)),            # gate and up, already [out, in]
    ('BTD,VD->BTV', (50, 32), (1,), (0,)),                 # the tied head
]


@pytest.mark.parametrize('eqn, shape, in_axes, out_axes', CONTRACTIONS,
                         ids=[c[0] for c in CONTRACTIONS])
@pytest.mark.parametrize('rows', [1, 5, TOKENS_FIRST_ROWS], ids=['decode', 'prefill', 'batch'])
def test_each_leaf_type_contracts_as_the_plain_einsum(eqn, shape, in_axes, out_axes, rows):
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x_spec = eqn.split(',')[0]
    sizes = dict(zip(eqn.split(',')[1].split('->')[0], shape)) | {'B': 1, 'T': rows, 'S': rows}
    x = jnp.asarray(rng.standard_normal([sizes[a] for a in x_spec]), jnp.float32)
    want = np.asarray(jnp.einsum(eqn, x, w, precision='highest'))
    order = serving_order(len(shape), in_axes, out_axes)
    relaid = ServingWeight(jnp.transpose(w, order), order)
    assert relaid.shape == shape
    # float32 throughout: only the summation order differs (~1e-6 on sums of 32-64 unit terms,
    # outputs up to ~30; the largest seen over 512 rows: 1.1e-5).
    np.testing.assert_allclose(contract(eqn, x, w), want, atol=F32_SUM_TOL, rtol=0)
    np.testing.assert_allclose(contract(eqn, x, relaid), want, atol=F32_SUM_TOL, rtol=0)
    if rows > 1:
        # A serving weight is the product's left operand (x's leading axes are [B=1, rows]),
        # held for training x from TOKENS_FIRST_ROWS rows on, with the same values.
        training = relaid.replace(tokens_first_rows=TOKENS_FIRST_ROWS)
        np.testing.assert_allclose(contract(eqn, x, training), want, atol=F32_SUM_TOL, rtol=0)
        assert product_shapes(lambda x: contract(eqn, x, relaid), x)[0][:2] != (1, rows)
        lhs, rhs = product_shapes(lambda x: contract(eqn, x, training), x)
        assert (lhs[:2] == (1, rows)) == (rows >= TOKENS_FIRST_ROWS), lhs
        if rows >= TOKENS_FIRST_ROWS and eqn == 'BTD,CFD->CBTF':
            # The stacked gate and up are one [C·F, D] weight there, which XLA's CPU backend
            # multiplies without transposing it.
            assert rhs == (shape[0] * shape[1], shape[2]), rhs
    quantized = quantize(jnp.transpose(w, order), len(shape) - len(in_axes), order)
    assert quantized.shape == shape
    # int8 weights and activation rows each round by up to half a step of 1/127 of their row's
    # absmax: measured up to 1.2% of the largest output (0.12 on outputs up to 10); a wrong
    # scale or axis gives errors of the size of the outputs.
    error = np.abs(np.asarray(contract(eqn, x, quantized)) - want).max()
    assert error < 0.03 * np.abs(want).max()


def product_shapes(fn, *args) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The operands' shapes of the first matrix product in `fn`'s traced program."""
    def products(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == 'dot_general':
                yield tuple(v.aval.shape for v in eqn.invars[:2])
            for param in eqn.params.values():
                inner = getattr(param, 'jaxpr', param)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from products(inner)
    return next(products(jax.make_jaxpr(fn)(*args).jaxpr))


def dequantized(leaf):
    """The checkpoint-order float32 weight an int8 or int4 leaf stores."""
    if isinstance(leaf, QuantizedWeight):
        stored = leaf.q.astype(jnp.float32) * leaf.scale.reshape(
            leaf.scale.shape + (1,) * (leaf.q.ndim - leaf.scale.ndim))
    else:
        stored = int4.dequantize(leaf.q, leaf.scale).reshape(leaf.serving_shape)
    return stored if leaf.order is None else jnp.transpose(stored, np.argsort(leaf.order))


@pytest.mark.parametrize('eqn, shape, in_axes, out_axes', CONTRACTIONS,
                         ids=[c[0] for c in CONTRACTIONS])
@pytest.mark.parametrize('fmt', ['int8', 'int4'])
def test_quantized_products_pass_the_gradient_straight_through(monkeypatch, eqn, shape, in_axes,
                                                                out_axes, fmt):
    # The activations are rounded to int8 inside the product, a step with zero derivative: the
    # gradient in x must instead be that of the product with the dequantized weight (what LoRA
    # needs to reach the adapters of earlier layers), equal up to float32 summation order
    # (~1e-6 of sums of 32-64 unit terms). The frozen weight's scales get none. int4 blocks of
    # 7 weight rows: the backward's scan over blocks and its remainder both run.
    monkeypatch.setattr(int4, 'DEQUANTIZE_BLOCK_BYTES', 7 * 4 * 64)
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    inputs, out_spec = eqn.split('->')
    x_spec, w_spec = inputs.split(',')
    sizes = dict(zip(w_spec, shape)) | {'B': 2, 'T': 5, 'S': 5}
    x = jnp.asarray(rng.standard_normal([sizes[a] for a in x_spec]), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal([sizes[a] for a in out_spec]), jnp.float32)
    order = serving_order(len(shape), in_axes, out_axes)
    num_leading = len(shape) - len(in_axes)
    leaf = (quantize(jnp.transpose(w, order), num_leading, order) if fmt == 'int8' else
            int4.quantize_int4(jnp.transpose(w, order), num_leading, order))
    grad = jax.grad(lambda x: jnp.sum(cotangent * contract(eqn, x, leaf)))(x)
    want = jnp.einsum(f'{out_spec},{w_spec}->{x_spec}', cotangent, dequantized(leaf),
                      precision='highest')
    np.testing.assert_allclose(grad, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
    scale_grad = jax.grad(lambda s: jnp.sum(contract(eqn, x, leaf.replace(scale=s)).astype(
        jnp.float32)))(leaf.scale.astype(jnp.float32))
    assert not np.any(scale_grad)


def test_lookup_reads_rows_of_every_leaf_type():
    table = jnp.asarray(np.random.default_rng(4).standard_normal((50, 32)), jnp.float32)
    ids = jnp.asarray([[0, 7, 49, 60]])                    # 60 is outside: clamps to row 49
    want = np.asarray(table)[[[0, 7, 49, 49]]]
    np.testing.assert_array_equal(lookup(table, ids, jnp.float32), want)
    np.testing.assert_array_equal(lookup(ServingWeight(table, (0, 1)), ids, jnp.float32), want)
    q = quantize(table, 1, (0, 1))
    np.testing.assert_allclose(lookup(q, ids, jnp.float32), want,
                               atol=float(q.scale.max()) / 2 + 1e-6, rtol=0)
    with pytest.raises(ValueError, match='cannot be read by rows'):
        lookup(ServingWeight(table.T, (1, 0)), ids, jnp.float32)
