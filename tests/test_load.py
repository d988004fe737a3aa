"""Tests of `gemma3n.load`: the demo, each checkpoint format, int8, and refusals before any read."""

import dataclasses
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma3n
from gemma3n import layout, loaded_model, loading, memory
from gemma3n.checkpoints import LazyPerLayerTable, hf_mapping, load_params, loader, save_params
from gemma3n.checkpoints.safetensors_hf import CONFIG_FILE, HFSoftcapWarning
from gemma3n.cli.model import LOAD_OPTION_FLAGS
from gemma3n.layers import QuantizedWeight
from gemma3n.models import demo_config
from gemma3n.text.tokenizer import default_tokenizer_path
from gemma3n.transformer import Gemma3nTransformer
from hf_oracle import make_hf_causal_lm, random_params, small_configs

CONFIG = small_configs()[0]
SEQUENCE_LENGTH = 24     # longer than the sliding window (8) of the small configs
# `load` holds the weights in the serving layout ([out, in], contracted in another order than
# the checkpoint layout that `load_params` + `model.apply` use): float32 sums in another order
# differ by a few ulps per layer, 1.0e-5 at most measured on these O(1-5) logits.
LAYOUT_TOLERANCE = 5e-5
# int8 weights (per output channel) and int8 activations (per row) against float32: the small
# model's logits differ by ~2-4% (relative L2); 10% would mean a broken scale, not rounding.
INT8_RELATIVE_L2 = 0.1


def _tokens(config, seed=0):
    return np.random.default_rng(seed).integers(1, config.num_embed, (2, SEQUENCE_LENGTH)).astype(np.int32)


def _reference_logits(path, config, tokens):
    """Logits of the checkpoint at `path` through the plain tree: `load_params` + `model.apply`."""
    model = Gemma3nTransformer(config=config, text_only=True, dtype=jnp.float32)
    params = load_params(path, model=model, dtype=np.float32, progress=False)
    return np.asarray(model.apply({'params': params}, jnp.asarray(tokens)).logits)


@pytest.fixture(scope='module')
def params():
    return random_params(CONFIG, seed=31)


@pytest.fixture(scope='module')
def hf_checkpoint(tmp_path_factory, params):
    """`save_pretrained` of a small random Gemma3nForCausalLM (sharded), with a tokenizer beside it."""
    hf_model = make_hf_causal_lm(CONFIG, params, hf_vocab_size=CONFIG.num_embed + hf_mapping.HF_EXTRA_VOCAB)
    hf_model.config.final_logit_softcapping = hf_mapping.HF_DEFAULT_FINAL_LOGIT_SOFTCAP   # None is not savable
    path = tmp_path_factory.mktemp('hf') / 'gemma3n-small'
    hf_model.save_pretrained(path, max_shard_size='100KB')
    shutil.copy(default_tokenizer_path(), path / loading.TOKENIZER_FILE)
    return path


@pytest.fixture(scope='module')
def native_checkpoint(tmp_path_factory, params):
    path = tmp_path_factory.mktemp('native') / 'model.safetensors'
    save_params(params, path)
    return path


@pytest.fixture(scope='module')
def demo():
    return gemma3n.load()


def test_load_without_a_path_is_the_demo_model(demo):
    assert demo.is_demo and demo.checkpoint is None and demo.per_layer_table is None
    assert demo.tokenizer.path == default_tokenizer_path()
    assert demo.config == demo_config(demo.tokenizer.vocab_size)
    assert demo.model.dtype == jnp.float32
    shapes = jax.eval_shape(demo.model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))['params']
    assert jax.tree.map(lambda leaf: leaf.shape, demo.params) == jax.tree.map(lambda leaf: leaf.shape, shapes)
    tokens = demo.tokenizer.encode('Why is the sky blue?', add_bos=True)
    logits = demo.apply([tokens]).logits
    assert logits.shape == (1, len(tokens), demo.config.num_embed) and np.isfinite(logits).all()
    assert isinstance(demo.sampler(cache_length=64).sample('Hello', max_new_tokens=3), str)
    assert 'random weights' in repr(demo) and 'built-in demo model' in demo.describe(cache_length=64)


@pytest.mark.parametrize('kind', ['hf', 'native'])
def test_lazy_table_formats_give_the_logits_of_load_params(kind, hf_checkpoint, native_checkpoint):
    tokens = _tokens(CONFIG)
    if kind == 'hf':
        path = hf_checkpoint
        with pytest.warns(HFSoftcapWarning, match='hf_softcap=True'):
            loaded = gemma3n.load(path, dtype='float32', progress=False)   # the config from config.json
    else:
        path = native_checkpoint
        loaded = gemma3n.load(path, model=CONFIG, dtype='float32', tokenizer=False, progress=False)
    with loaded:
        assert loaded.config == CONFIG and loaded.name == (
            loaded_model.CONFIG_JSON_MODEL if kind == 'hf' else loaded_model.CUSTOM_MODEL)
        assert isinstance(loaded.per_layer_table, LazyPerLayerTable)
        assert 'embedder/per_layer_input_embedding' not in hf_mapping.flatten_params(loaded.params)
        np.testing.assert_allclose(np.asarray(loaded.apply(tokens).logits),
                                   _reference_logits(path, CONFIG, tokens), atol=LAYOUT_TOLERANCE, rtol=0)
        assert str(path) in repr(loaded) and 'read row by row' in loaded.describe(cache_length=64)


def test_orbax_checkpoint_gives_the_logits_of_load_params(tmp_path, params):
    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / 'orbax', params)
    checkpointer.wait_until_finished()
    loaded = gemma3n.load(tmp_path / 'orbax', model=CONFIG, dtype='float32', tokenizer=False,
                          progress=False)
    assert loaded.per_layer_table is None          # Orbax restores the table with the tree
    tokens = _tokens(CONFIG, seed=1)
    np.testing.assert_allclose(np.asarray(loaded.apply(tokens).logits),
                               _reference_logits(tmp_path / 'orbax', CONFIG, tokens),
                               atol=LAYOUT_TOLERANCE, rtol=0)


def test_the_format_and_config_json_are_read_once(hf_checkpoint, monkeypatch):
    calls = {'format': 0, CONFIG_FILE: 0}

    def counted(function, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)
        return wrapper

    # Every module that holds the functions, so no caller escapes the count.
    for name, module in list(sys.modules.items()):
        if name.startswith('gemma3n') and getattr(module, 'checkpoint_format', None) is loader.checkpoint_format:
            monkeypatch.setattr(module, 'checkpoint_format', counted(loader.checkpoint_format, 'format'))
    real_read_text = type(hf_checkpoint).read_text

    def read_text(path, *args, **kwargs):
        if path.name == CONFIG_FILE:
            calls[CONFIG_FILE] += 1
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(type(hf_checkpoint), 'read_text', read_text)
    with pytest.warns(HFSoftcapWarning):
        gemma3n.load(hf_checkpoint, hf_softcap=False, progress=False).close()
    assert calls == {'format': 1, CONFIG_FILE: 1}


def test_hf_softcap_takes_the_cap_of_config_json(hf_checkpoint):
    plan = loading.prepare(hf_checkpoint, hf_softcap=True)
    assert plan.model.config.final_logit_softcap == hf_mapping.HF_DEFAULT_FINAL_LOGIT_SOFTCAP
    assert plan.unused_softcap is None


def test_int8_loads_and_samples(tmp_path):
    # The packaged tokenizer's vocabulary, so that text prompts map into the model's.
    config = dataclasses.replace(CONFIG, num_embed=demo_config(4096).num_embed)
    save_params(random_params(config, seed=32), tmp_path / 'model.safetensors')
    shutil.copy(default_tokenizer_path(), tmp_path / loading.TOKENIZER_FILE)
    plain = gemma3n.load(tmp_path / 'model.safetensors', model=config, dtype='float32', progress=False)
    int8 = gemma3n.load(tmp_path / 'model.safetensors', model=config, dtype='float32', quantize='int8',
                        progress=False)
    assert isinstance(int8.params['embedder']['input_embedding'], QuantizedWeight)
    # What the plan counted before loading (the memory check) is what the weights hold.
    assert int8.weights_nbytes == layout.serving_nbytes(plain.model, jnp.float32, quantize_int8=True)
    assert int8.weights_nbytes < plain.weights_nbytes
    tokens = _tokens(config, seed=2)
    expected = np.asarray(plain.apply(tokens).logits)
    error = np.linalg.norm(np.asarray(int8.apply(tokens).logits) - expected) / np.linalg.norm(expected)
    assert error < INT8_RELATIVE_L2
    assert isinstance(int8.sampler(cache_length=64).sample('Hello', max_new_tokens=3), str)
    assert 'int8' in repr(int8)


def test_bad_inputs_are_refused_before_any_weight_is_read(hf_checkpoint, tmp_path, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError('weights were read')
    monkeypatch.setattr(loading, 'load_serving', no_reads)
    monkeypatch.setattr(loading, 'open_per_layer_table', no_reads)

    with pytest.raises(FileNotFoundError, match='checkpoint not found: .*nowhere'):
        gemma3n.load(tmp_path / 'nowhere')
    empty = tmp_path / 'empty'
    empty.mkdir()
    shutil.copy(default_tokenizer_path(), empty / loading.TOKENIZER_FILE)
    with pytest.raises(ValueError, match='not a recognised checkpoint directory'):
        gemma3n.load(empty)
    with pytest.raises(gemma3n.LoadError, match='no tokenizer.model in .*: pass tokenizer=PATH'):
        gemma3n.load(_without_tokenizer(tmp_path, hf_checkpoint))
    with pytest.raises(gemma3n.LoadError) as mismatch:
        gemma3n.load(hf_checkpoint, model='e2b')
    assert "model='e2b' does not fit" in str(mismatch.value) and 'num_hidden_layers=10, expected 30' in str(
        mismatch.value)
    assert mismatch.value.describe(LOAD_OPTION_FLAGS).startswith('--model e2b does not fit')
    for options, fragment in [({'quantize': 'int2'}, "quantize='int2' is not a quantization format"),
                              ({'dtype': 'int8'}, "dtype='int8' is not a dtype"),
                              ({'model': 'e9b'}, "model='e9b' is no model name"),
                              ({'with_vision': True}, 'holds none'),
                              ({'tokenizer': False, 'model': 'demo'}, 'leave tokenizer out')]:
        with pytest.raises(gemma3n.LoadError, match=fragment):
            gemma3n.load(hf_checkpoint, **options)
    with pytest.raises(gemma3n.LoadError, match="model='e4b' needs path=PATH"):
        gemma3n.load(model='e4b')

    monkeypatch.setattr(memory, 'available_bytes', lambda device=None: 1000)
    with pytest.warns(HFSoftcapWarning), pytest.raises(
            gemma3n.InsufficientMemoryError, match="available: use quantize='int8'"):
        gemma3n.load(hf_checkpoint)


def _without_tokenizer(tmp_path, hf_checkpoint):
    """A copy of the checkpoint with nothing beside its weights but config.json."""
    copy = tmp_path / 'no-tokenizer'
    shutil.copytree(hf_checkpoint, copy)
    (copy / loading.TOKENIZER_FILE).unlink()
    return copy
