"""Tests of converted checkpoints (`gemma3n convert`, `gemma3n.converted`): loaded by mapping
their file, they give bit for bit the weights and logits of the load they were written from;
damaged files and representation mismatches are refused, naming what is wrong, before any
weight is used."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma3n
from gemma3n import converted, loading
from gemma3n.checkpoints import save_checkpoint_folder
from gemma3n.checkpoints.loader import SERVING_FORMAT, load_params
from gemma3n.checkpoints.safetensors_files import HEADER_LENGTH_FORMAT
from gemma3n.checkpoints.serving_file import (SERVING_FILE, Tensor, map_serving_file,
                                              write_serving_file)
from gemma3n.host_arrays import DEVICE_ALIGNMENT
from gemma3n.layers import Int4Weight, QuantizedWeight, ServingWeight, StackedWeight
from gemma3n.load_error import LoadError
from gemma3n.text.tokenizer import default_tokenizer_path
from cli_runner import cli_env, run_cli
from hf_oracle import random_params, small_configs

CONFIG = small_configs()[0]
# (dtype, quantize) of the loads converted: every leaf type and both dtypes appear.
REPRESENTATIONS = [('float32', None), ('bfloat16', 'int8'), ('float32', 'int4')]
LEAF_TYPES = {None: ServingWeight, 'int8': QuantizedWeight, 'int4': Int4Weight}
TOKENS = np.array([[2, 17, 250, 3, 99, 5]], np.int32)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """A small random checkpoint folder (our format, with config.json and a tokenizer)."""
    folder = tmp_path_factory.mktemp('source')
    save_checkpoint_folder(random_params(CONFIG, seed=5), CONFIG, folder,
                           tokenizer_file=default_tokenizer_path())
    return folder


@pytest.fixture(scope='module')
def conversions(tmp_path_factory, source):
    """{(dtype, quantize): (the load converted, the converted folder)}."""
    made = {}
    for dtype, quantize in REPRESENTATIONS:
        original = gemma3n.load(source, dtype=dtype, quantize=quantize, progress=False)
        folder = tmp_path_factory.mktemp(f'converted-{dtype}-{quantize}')
        converted.save_converted(folder, original)
        made[dtype, quantize] = original, folder
    return made


def _assert_same_leaves(expected, actual):
    assert jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(actual)
    for x, y in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(actual)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('representation', REPRESENTATIONS, ids=str)
def test_a_converted_folder_loads_bit_for_bit_what_was_converted(conversions, representation):
    original, folder = conversions[representation]
    loaded = gemma3n.load(folder, progress=False)       # dtype and quantize as stored
    assert loaded.checkpoint.format == SERVING_FORMAT
    assert (jnp.dtype(loaded.model.dtype).name, loaded.quantize) == representation
    assert loaded.config == original.config
    _assert_same_leaves(original.params, loaded.params)
    leaf_type = LEAF_TYPES[representation[1]]
    assert any(isinstance(leaf, leaf_type) for leaf in jax.tree_util.tree_leaves(
        loaded.params, is_leaf=lambda x: isinstance(x, leaf_type)))
    # Sparse layers' gate and up are stacked leaves: their parts are stored one by one too.
    assert isinstance(loaded.params['layer_0']['mlp']['gating_einsum'], StackedWeight)
    ids = np.arange(CONFIG.num_embed)
    np.testing.assert_array_equal(loaded.per_layer_table[ids], original.per_layer_table[ids])
    np.testing.assert_array_equal(np.asarray(loaded.apply(TOKENS).logits),
                                  np.asarray(original.apply(TOKENS).logits))
    # Asked for explicitly, the stored representation loads as well.
    dtype, quantize = representation
    assert gemma3n.load(folder, dtype=dtype, quantize=quantize, progress=False).quantize == quantize


def test_mapped_arrays_are_adopted_without_a_copy(conversions):
    _, folder = conversions['float32', None]
    path = folder / SERVING_FILE
    with open(path, 'rb') as f:
        (header_length,) = struct.unpack(HEADER_LENGTH_FORMAT, f.read(8))
    assert (8 + header_length) % DEVICE_ALIGNMENT == 0
    loaded = gemma3n.load(folder, progress=False)
    weight = loaded.params['layer_0']['attn']['q_einsum']['w'].value
    _, arrays = map_serving_file(path)
    assert arrays['layer_0/attn/q_einsum/w:value'].ctypes.data % DEVICE_ALIGNMENT == 0
    # The device array lives in a mapping of the file, not in a buffer of its own (Linux).
    pointer = weight.unsafe_buffer_pointer()
    mapped = [line.split()[0].split('-') for line in open('/proc/self/maps')
              if line.rstrip().endswith(str(path))]
    assert any(int(start, 16) <= pointer < int(end, 16) for start, end in mapped)
    np.testing.assert_array_equal(np.asarray(weight), arrays['layer_0/attn/q_einsum/w:value'])


def test_another_representation_is_refused_before_any_weight_is_read(conversions, monkeypatch):
    _, folder = conversions['bfloat16', 'int8']
    monkeypatch.setattr(loading, 'load_converted', _never)
    with pytest.raises(LoadError, match=r"quantize='int4' does not match .* converted with int8"):
        gemma3n.load(folder, quantize='int4')
    with pytest.raises(LoadError, match=r"dtype='float32' does not match .* converted in bfloat16"):
        gemma3n.load(folder, dtype='float32')
    with pytest.raises(ValueError, match='converted checkpoint'):
        load_params(folder)                   # the checkpoint layout is the original's


def _never(*args, **kwargs):
    raise AssertionError('weights read before the arguments were checked')


def test_a_truncated_file_is_refused_naming_it(conversions, tmp_path, monkeypatch):
    _, folder = conversions['float32', 'int4']
    copy = tmp_path / 'cut'
    copy.mkdir()
    for name in ('config.json', 'tokenizer.model'):
        (copy / name).write_bytes((folder / name).read_bytes())
    data = (folder / SERVING_FILE).read_bytes()
    (copy / SERVING_FILE).write_bytes(data[:len(data) - 100])
    monkeypatch.setattr(loading, 'load_converted', _never)
    with pytest.raises(ValueError, match='truncated or corrupted'):
        gemma3n.load(copy)


def _rewrite(folder, target, change):
    """target: a copy of converted `folder` whose tensors `change(dict)` altered."""
    target.mkdir()
    for name in ('config.json', 'tokenizer.model'):
        (target / name).write_bytes((folder / name).read_bytes())
    metadata, arrays = map_serving_file(folder / SERVING_FILE)
    change(arrays)
    write_serving_file(target / SERVING_FILE,
                       [Tensor(key, x.shape, x.dtype, lambda x=x: [x]) for key, x in arrays.items()],
                       {k: v for k, v in metadata.items() if k in (converted.DTYPE_KEY,
                                                                   converted.QUANTIZE_KEY)})
    return target


def test_missing_extra_and_misshapen_tensors_are_named(conversions, tmp_path):
    _, folder = conversions['bfloat16', 'int8']

    def damage(arrays):
        arrays.pop('final_norm/scale')
        arrays['layer_1/mlp/gating_einsum:parts/0/q'] = arrays['layer_1/mlp/gating_einsum:parts/0/q'][:-1]
        arrays['layer_1/mlp/gating_einsum:parts/0/scale'] = arrays['layer_1/mlp/gating_einsum:parts/0/scale'].astype(
            np.float16)
        arrays['stray'] = np.zeros(3, np.float32)

    damaged = _rewrite(folder, tmp_path / 'damaged', damage)
    with pytest.raises(ValueError) as error:
        gemma3n.load(damaged)
    for fragment in ('1 missing: final_norm/scale', '1 unexpected: stray',
                     'layer_1/mlp/gating_einsum:parts/0/q is int8', 'layer_1/mlp/gating_einsum:parts/0/scale is float16'):
        assert fragment in str(error.value)


def test_non_finite_weights_are_refused_naming_the_tensor(conversions, tmp_path):
    _, folder = conversions['float32', None]

    def poison(arrays):
        arrays['final_norm/scale'] = arrays['final_norm/scale'].copy()
        arrays['final_norm/scale'][3] = np.nan

    with pytest.raises(ValueError, match='final_norm/scale'):
        gemma3n.load(_rewrite(folder, tmp_path / 'nan', poison))


def test_a_newer_version_is_refused(conversions, tmp_path):
    _, folder = conversions['float32', None]
    data = bytearray((folder / SERVING_FILE).read_bytes())
    (length,) = struct.unpack(HEADER_LENGTH_FORMAT, data[:8])
    header = json.loads(data[8:8 + length])
    header['__metadata__']['format_version'] = '99'
    text = json.dumps(header, separators=(',', ':')).encode()
    assert len(text) <= length
    data[8:8 + length] = text + b' ' * (length - len(text))
    newer = tmp_path / 'newer'
    newer.mkdir()
    (newer / SERVING_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="version '99'"):
        gemma3n.load(newer, tokenizer=False)


def test_the_command_converts_and_generates_the_same_tokens(tmp_path_factory, tmp_path):
    env = cli_env(tmp_path_factory)
    folder = tmp_path / 'demo-int4'
    result = run_cli(env, 'convert', '--int4', '--out', str(folder))
    assert result.returncode == 0, result.stderr
    assert 'serving layout, float32, int4' in result.stdout
    args = ('--max-new-tokens', '10', 'Hello')
    from_folder = run_cli(env, 'generate', '--checkpoint', str(folder), *args)
    assert from_folder.returncode == 0, from_folder.stderr
    demo = run_cli(env, 'generate', '--int4', *args)
    assert demo.returncode == 0, demo.stderr
    assert from_folder.stdout == demo.stdout
    again = run_cli(env, 'convert', '--out', str(folder))
    assert again.returncode == 2 and 'already holds a checkpoint' in again.stderr
