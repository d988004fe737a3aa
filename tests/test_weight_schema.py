"""The weight schema: one declaration per weight, read for checkpoint validation and layouts."""

import json

import pytest

from gemma3n import Gemma3n_E4B
from gemma3n.layers import axes
from gemma3n.schema import model_schema
from reference import E4B_PARAMS_JSON, E4B_TEXT_PARAMS_JSON

LOGICAL_AXES = {value for name, value in vars(axes).items() if name.isupper()}
# The seed's SigLIP encoder is built from flax's own layers, which do not declare axis names.
UNDECLARED_PREFIX = 'vision_encoder/'


def _reference(path):
    return {k: (tuple(v['shape']), v['dtype']) for k, v in json.loads(path.read_text()).items()}


@pytest.fixture(scope='module')
def e4b_schema():
    return model_schema(Gemma3n_E4B(text_only=True))


def test_e4b_schema_is_exactly_the_reference_tree_with_every_axis_named(e4b_schema):
    assert {path: (info.shape, str(info.dtype)) for path, info in e4b_schema.items()} == \
        _reference(E4B_TEXT_PARAMS_JSON)
    for path, info in e4b_schema.items():
        assert info.axes is not None and len(info.axes) == len(info.shape), path
        assert set(info.axes) <= LOGICAL_AXES, path
        # A weight never names two of its axes alike: a sharding rule could not tell them apart.
        assert len(set(info.axes)) == len(info.axes), path


def test_e4b_declarations_say_what_each_projection_reads_and_writes(e4b_schema):
    q = e4b_schema['layer_0/attn/q_einsum/w']                      # [N, D, H]
    assert q.axes == ('q_heads', 'embed', 'head_dim') and (q.in_axes, q.out_axes) == ((1,), (2,))
    assert q.serving_order == (0, 2, 1)                             # [N, H, D]
    kv = e4b_schema['layer_0/attn/kv_einsum/w']                    # [2, K, D, H]
    assert kv.axes == ('kv', 'kv_heads', 'embed', 'head_dim') and kv.serving_order == (0, 1, 3, 2)
    out = e4b_schema['layer_0/attn/attn_vec_einsum/w']             # [N, H, D]
    assert (out.in_axes, out.out_axes, out.serving_order) == ((0, 1), (2,), (2, 0, 1))
    assert e4b_schema['layer_0/mlp/gating_einsum'].axes == ('gate', 'mlp', 'embed')
    assert e4b_schema['embedder/input_embedding'].serving_order == (0, 1)   # [V, D] is [out, in]
    assert 'layer_20/attn/kv_einsum/w' not in e4b_schema                   # a K/V-sharing layer
    projections = {path for path, info in e4b_schema.items() if info.is_projection}
    # Norm scales, AltUp coefficients and the per-layer table are applied without `contract`.
    assert not any(path.endswith(('scale', '_coefs', 'per_layer_input_embedding'))
                   for path in projections)
    # The embedding, the per-layer input projection, AltUp in and out, 9 per layer, K/V of 20.
    assert len(projections) == 1 + 1 + 2 * 3 + 35 * 9 + 20
    assert all(not info.in_axes for path, info in e4b_schema.items()
               if path.endswith(('scale', 'correct_output_scale')))


def test_e4b_schema_with_the_vision_encoder_covers_the_whole_tree():
    schema = model_schema(Gemma3n_E4B())
    assert {path: (info.shape, str(info.dtype)) for path, info in schema.items()} == \
        _reference(E4B_PARAMS_JSON)
    named = {path for path, info in schema.items() if info.axes is not None}
    assert named == {path for path in schema if not path.startswith(UNDECLARED_PREFIX)}
    assert schema['embedder/mm_input_projection/w'].axes == ('vision_embed', 'embed')
