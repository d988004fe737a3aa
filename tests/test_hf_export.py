"""Tests of gemma3n.checkpoints.hf_export and `gemma3n export`: our weights as a Hugging Face
checkpoint that transformers loads and computes our logits with."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from gemma3n import Gemma3nTransformer
from gemma3n.checkpoints import hf_config, hf_mapping, load_params, save_hf
from cli_runner import cli_env, demo_model, run_cli
from hf_oracle import random_params, small_configs

CONFIG = small_configs()[0]
# The float32 parity bound of tests/test_model.py (F32_LOGIT_TOL, reasoned there): the exported
# checkpoint must compute what the in-memory oracle computes, which agrees with us to ~5e-5.
F32_LOGIT_TOL = 1e-4
# Small enough that the small config's weights fill several shards.
SHARD_BYTES = 200_000


@pytest.fixture(scope='module')
def params():
    return random_params(CONFIG, seed=7)


@pytest.fixture(scope='module')
def exported(params, tmp_path_factory):
    directory = tmp_path_factory.mktemp('export') / 'hf'
    files = save_hf(directory, params, CONFIG, dtype='float32', max_shard_bytes=SHARD_BYTES)
    return directory, files


def test_transformers_loads_the_export_and_computes_our_logits(params, exported):
    directory, files = exported
    index = json.loads((directory / 'model.safetensors.index.json').read_text())
    shards = sorted({name for name in index['weight_map'].values()})
    assert len(shards) > 1 and {directory / name for name in shards} <= set(files)
    hf = transformers.Gemma3nForCausalLM.from_pretrained(
        directory, attn_implementation='eager', dtype=torch.float32).eval()
    assert hf.config.final_logit_softcapping == hf_config.HF_NO_SOFTCAP
    assert hf_config.hf_final_logit_softcap(hf.config.to_dict()) is None     # ours reads no cap

    tokens = np.random.default_rng(0).integers(1, CONFIG.num_embed, (2, 24))   # 3 windows
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    model = Gemma3nTransformer(config=CONFIG, text_only=True, dtype=jnp.float32)
    ours = np.asarray(jax.jit(model.apply)({'params': params}, tokens).logits)
    assert 1.0 < np.abs(ours).max() < 20.0
    # HF's vocabulary has the hub's extra rows, copies of the pad row (docs/architecture.md §8).
    np.testing.assert_allclose(theirs[..., :CONFIG.num_embed], ours, atol=F32_LOGIT_TOL, rtol=0)
    np.testing.assert_array_equal(theirs[..., CONFIG.num_embed:],
                                  np.broadcast_to(theirs[..., :1], theirs[..., CONFIG.num_embed:].shape))


def test_the_export_reads_back_bit_exact(params, exported):
    back = hf_mapping.flatten_params(load_params(exported[0], model=CONFIG))
    for path, value in hf_mapping.flatten_params(params).items():
        np.testing.assert_array_equal(back[path], value, err_msg=path)


def test_bfloat16_export_is_one_file_of_cast_weights(params, tmp_path):
    files = save_hf(tmp_path / 'bf16', params, CONFIG, dtype=jnp.bfloat16)
    assert [f.name for f in files] == ['model.safetensors', 'config.json']
    stored = load_file(files[0])
    expected = hf_mapping.params_to_hf(params, CONFIG, prefix='model.')
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        assert stored[key].dtype == ml_dtypes.bfloat16, key
        np.testing.assert_array_equal(stored[key], value.astype(ml_dtypes.bfloat16), err_msg=key)
    assert json.loads(files[1].read_text())['dtype'] == 'bfloat16'


def test_vision_parameters_are_left_out(params, tmp_path):
    with_vision = {**params, 'vision_encoder': {'siglip_encoder': {'w': np.ones(3, np.float32)}},
                   'embedder': {**params['embedder'],
                                'mm_input_projection': {'w': np.ones((2, 2), np.float32)}}}
    files = save_hf(tmp_path / 'out', with_vision, CONFIG, dtype='float32')
    assert load_file(files[0]).keys() == hf_mapping.params_to_hf(params, CONFIG, prefix='model.').keys()


@pytest.mark.parametrize('change, message', [
    (dict(config=dataclasses.replace(CONFIG, scale_plus_one=True)), 'scale_plus_one=True'),
    (dict(dtype='float16'), "cannot export in dtype 'float16'"),
    (dict(nan=True), 'Weight model.norm.weight'),
    (dict(existing=True), 'already holds a checkpoint (config.json)'),
])
def test_refusals_come_before_any_file(params, tmp_path, change, message):
    directory = tmp_path / 'out'
    kwargs = dict(dtype=change.get('dtype', 'float32'))
    config = change.get('config', CONFIG)
    if change.get('nan'):
        params = {**params, 'final_norm': {'scale': np.full(CONFIG.embed_dim, np.nan, np.float32)}}
    if change.get('existing'):
        directory.mkdir()
        (directory / 'config.json').write_text('{}')
    before = sorted(tmp_path.rglob('*'))
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        save_hf(directory, params, config, **kwargs)
    assert sorted(tmp_path.rglob('*')) == before


def test_export_command_writes_the_demo_model(tmp_path_factory, tmp_path):
    out = tmp_path / 'demo-hf'
    result = run_cli(cli_env(tmp_path_factory), 'export', '--out', str(out))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout and 'Gemma3nForCausalLM' in result.stdout
    model, params, tokenizer = demo_model()
    assert (out / 'tokenizer.model').read_bytes() == tokenizer.path.read_bytes()
    back = hf_mapping.flatten_params(load_params(out, model=model))
    for path, value in hf_mapping.flatten_params(params).items():
        np.testing.assert_array_equal(back[path], np.asarray(value), err_msg=path)
