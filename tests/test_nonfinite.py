"""No silent wrong answers from broken weights or numerics (issue 12, class 5).

Checkpoints have no checksum of their values: every loader checks each array for NaN/Inf as it
reads it and names the tensor. Logits that become NaN/Inf stop generation with an error instead
of yielding padding. Python API and command line.
"""

import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from gemma3n import cli, save_params
from gemma3n.checkpoints import hf_mapping, load_params, open_per_layer_table
from gemma3n.embedder import PER_LAYER_TABLE_PATH
from gemma3n.layout import load_serving
from gemma3n.models import DEMO_SEED, demo_config
from gemma3n.text import special_tokens
from gemma3n.text.sampler import Sampler
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
from gemma3n.transformer import Gemma3nTransformer
from gemma3n.validation import check_all_finite, check_finite
from cli_runner import cli_env, run_cli, without_compile_notices
from hf_oracle import random_params, small_configs

CONFIG = small_configs()[0]
DAMAGED = 'layer_3/mlp/linear'                # any weight: the one the tests break
EMBEDDING = 'embedder/input_embedding'
# Finite, but the embedding scale (sqrt(width)) takes it past float32's range: the activations
# overflow to Inf, then NaN, inside the model.
HUGE = 1e38
POISON_TOKEN = 7
PROGRESS_BAR = 'Loading model.safetensors:'


def flat_params(seed=0, dtype=np.float32):
    return {k: v.astype(dtype) for k, v in hf_mapping.flatten_params(random_params(CONFIG, seed)).items()}


def damaged(flat, path=DAMAGED, index=(1, 2), value=np.nan):
    out = dict(flat)
    out[path] = flat[path].copy()
    out[path][index] = value
    return out


# ---- the check itself ------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_check_finite_finds_every_nan_and_inf(dtype):
    x = np.ones((3, 700, 1000), dtype)            # over two chunks of the check
    x[0, 0, 0], x[2, 699, 998] = np.finfo(dtype).max, -np.finfo(dtype).max    # finite extremes
    check_finite('x', x)
    check_finite('x', x.transpose(2, 0, 1))
    for bad in (np.nan, np.inf, -np.inf):
        for index in ((0, 0, 0), (1, 350, 500), (2, 699, 999)):
            y = x.copy()
            y[index] = bad
            for view in (y, y.transpose(2, 0, 1), y[:, ::-1]):
                with pytest.raises(ValueError, match=f'holds 1 non-finite value\\(s\\).*as {np.dtype(dtype).name}'):
                    check_finite('y', view)
    check_finite('ints', np.arange(10))            # integers are always finite


def test_check_all_finite_names_the_first_bad_array_in_order():
    arrays = {f'a{i}': np.ones((300, 1000), np.float32) for i in range(8)}
    check_all_finite(arrays)
    arrays['a3'][7, 9], arrays['a6'][0, 0] = np.inf, np.nan     # checked at once, a3 named
    for _ in range(5):
        with pytest.raises(ValueError, match=r'^a3 holds 1 non-finite value.*index \(7, 9\)'):
            check_all_finite(arrays)
    del arrays['a3']
    with pytest.raises(ValueError, match='^a6 holds'):
        check_all_finite(arrays)


# ---- every checkpoint format -----------------------------------------------------------------

def test_native_file_with_nan_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / 'model.safetensors'
    save_params(hf_mapping.unflatten_params(damaged(flat_params())), path)
    pattern = f'Tensor {DAMAGED} \\(in .*model.safetensors\\) holds 1 non-finite value.*index \\(1, 2\\)'
    with pytest.raises(ValueError, match=pattern):
        load_params(path, model=CONFIG, progress=False)
    model = Gemma3nTransformer(config=CONFIG, text_only=True, dtype=jnp.float32)
    for quantize_int8 in (False, True):             # the serving loader, as the command uses it
        with pytest.raises(ValueError, match=pattern):
            load_serving(path, model, quantize_int8=quantize_int8, progress=False)


def test_hf_safetensors_with_inf_is_refused_naming_the_hf_tensor(tmp_path):
    path = tmp_path / 'weights.safetensors'
    save_file(hf_mapping.params_to_hf(hf_mapping.unflatten_params(damaged(flat_params(), value=np.inf)),
                                      CONFIG, prefix='model.'), str(path))
    with pytest.raises(ValueError, match=r'Tensor model\.layers\.3\.mlp\.down_proj\.weight \(in .*weights\.'
                                         r'safetensors\) holds 1 non-finite'):
        load_params(path, model=CONFIG, progress=False)


def test_orbax_checkpoint_with_nan_is_refused_naming_the_array(tmp_path):
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / 'orbax', hf_mapping.unflatten_params(damaged(flat_params())))
    checkpointer.wait_until_finished()
    with pytest.raises(ValueError, match=f'Array {DAMAGED} of .*orbax holds 1 non-finite'):
        load_params(tmp_path / 'orbax', model=CONFIG, progress=False)


def test_values_beyond_the_target_dtype_are_refused(tmp_path):
    # Finite in float32, Inf once cast to float16 (max 65504).
    path = tmp_path / 'model.safetensors'
    save_params(hf_mapping.unflatten_params(damaged(flat_params(), value=1e5)), path)
    load_params(path, model=CONFIG, progress=False)
    with pytest.raises(ValueError, match=f'{DAMAGED} .*as float16.*do not fit float16'):
        load_params(path, model=CONFIG, dtype=np.float16, progress=False)


def test_lazy_per_layer_table_checks_the_rows_it_reads(tmp_path):
    path = tmp_path / 'model.safetensors'
    save_params(hf_mapping.unflatten_params(damaged(flat_params(), PER_LAYER_TABLE_PATH, (POISON_TOKEN, 1, 2))), path)
    with open_per_layer_table(path, model=CONFIG) as table:
        assert np.isfinite(table[np.array([[2, 3]])].astype(np.float32)).all()
        with pytest.raises(ValueError, match=f'Tensor {PER_LAYER_TABLE_PATH} in .*model.safetensors \\(rows '
                                             f'\\[2, {POISON_TOKEN}\\]\\) holds 1 non-finite'):
            table[np.array([[2, POISON_TOKEN]])]


# ---- logits that become NaN/Inf while generating ---------------------------------------------

@pytest.fixture(scope='module')
def poisoned_sampler():
    """A sampler whose per-layer embedding row of POISON_TOKEN is finite but overflows inside
    the model: only sequences fed that token break (the input embedding, tied to the output
    layer, would make that token's logit Inf everywhere)."""
    flat = flat_params()
    flat[PER_LAYER_TABLE_PATH] = flat[PER_LAYER_TABLE_PATH].copy()
    flat[PER_LAYER_TABLE_PATH][POISON_TOKEN] = HUGE
    model = Gemma3nTransformer(config=CONFIG, text_only=True, dtype=jnp.float32)
    return Sampler(model=model, params=hf_mapping.unflatten_params(flat), cache_length=32)


def test_nan_logits_stop_generation_with_an_error(poisoned_sampler):
    healthy = poisoned_sampler.sample_tokens([[2, 3]], 4)
    assert healthy.tokens.shape == (1, 4)
    with pytest.raises(FloatingPointError, match='logits of sequence 0 became NaN/Inf at new token 1'):
        poisoned_sampler.sample_tokens([[2, POISON_TOKEN]], 4)


def test_the_error_names_the_broken_sequence_of_a_batch(poisoned_sampler):
    with pytest.raises(FloatingPointError, match='sequence 1 became NaN/Inf'):
        poisoned_sampler.sample_tokens([[2, 3], [2, POISON_TOKEN]], 4)


def test_a_continuation_that_breaks_the_numerics_raises(poisoned_sampler):
    first = poisoned_sampler.sample_tokens([[2, 3]], 2)
    with pytest.raises(FloatingPointError, match='sequence 0 became NaN/Inf at new token 1'):
        poisoned_sampler.sample_tokens([[POISON_TOKEN]], 2, state=first.state)


# ---- the command line ------------------------------------------------------------------------

@pytest.fixture(scope='module')
def env(tmp_path_factory):
    return cli_env(tmp_path_factory)



@pytest.fixture(scope='module')
def demo_flat():
    """The demo model's weights, flat, as numpy float32."""
    tokenizer = Tokenizer(default_tokenizer_path())
    model = Gemma3nTransformer(config=demo_config(tokenizer.vocab_size), text_only=True, dtype=jnp.float32)
    params = jax.jit(model.init)(jax.random.key(DEMO_SEED), jnp.ones((1, 1), jnp.int32))['params']
    return {k: np.asarray(v) for k, v in hf_mapping.flatten_params(params).items()}


def demo_checkpoint(directory, flat):
    save_params(hf_mapping.unflatten_params(flat), directory / 'model.safetensors')
    shutil.copy(default_tokenizer_path(), directory / 'tokenizer.model')
    return ['--model', 'demo', '--dtype', 'float32', '--checkpoint', str(directory / 'model.safetensors')]


def assert_one_line_error(result, status, *fragments):
    """One error line, after at most the loader's progress bar."""
    assert result.returncode == status, result
    assert result.stdout == '' and 'Traceback' not in result.stderr
    *before, error = without_compile_notices(result.stderr).splitlines()
    assert all(line.startswith(PROGRESS_BAR) or not line for line in before), result.stderr
    assert error.startswith('gemma3n: error: ')
    for fragment in fragments:
        assert fragment in error, result.stderr


@pytest.mark.parametrize('path', ['layer_2/attn/q_einsum/w', PER_LAYER_TABLE_PATH])
def test_command_refuses_a_checkpoint_with_nan(env, demo_flat, tmp_path, path):
    # The per-layer table is read row by row while generating: its rows are checked as read.
    index = (special_tokens.BOS, 0, 0)
    options = demo_checkpoint(tmp_path, damaged(demo_flat, path, index))
    result = run_cli(env, 'generate', *options, 'Hello')
    assert_one_line_error(result, cli.USAGE_ERROR, path, 'model.safetensors', 'non-finite')


@pytest.mark.parametrize('command', ['generate', 'chat'])
def test_command_stops_on_nan_logits(env, demo_flat, tmp_path, command):
    # Finite weights whose numbers overflow (the logit of BOS is Inf): an error and status 1,
    # not an empty answer.
    options = demo_checkpoint(tmp_path, damaged(demo_flat, EMBEDDING, special_tokens.BOS, HUGE))
    args = [command, *options] + (['Hello'] if command == 'generate' else [])
    result = run_cli(env, *args, stdin='Hello\n')
    if command == 'chat':       # its greeting comes before the answer
        lines = result.stderr.splitlines(keepends=True)
        assert sum(line.startswith('gemma3n: chatting with') for line in lines) == 1
        result.stderr = ''.join(line for line in lines if not line.startswith('gemma3n: chatting'))
    assert_one_line_error(result, cli.NUMERICAL_FAILURE, 'the logits of sequence 0 became NaN/Inf '
                          'at new token 1: the weights hold NaN/Inf or the computation overflowed '
                          'in float32; generation stopped.')
