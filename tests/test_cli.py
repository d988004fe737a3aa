"""Tests of the `gemma3n` command: the real command in a subprocess, checked against the library.

The demo model's answers are compared with the same model run in-process through `Sampler` and
`ChatSampler` (greedy, so both must pick the same tokens). Subprocesses share one JAX
compilation cache folder, so only the first one compiles the demo model.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gemma3n import cli, save_params
from gemma3n.layers import Int4Weight, QuantizedWeight
from gemma3n.layout import to_serving
from gemma3n.text import special_tokens
from gemma3n.text.chat_format import add_image_markers, format_user_turn
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH, Sampler
from gemma3n.engine.sampling import Greedy, RandomSampling, TopkSampling, TopPSampling
from gemma3n.text.tokenizer import default_tokenizer_path
from gemma3n.vision import SigLiPFromPatches, ViTModel, VisionExit
from gemma3n.vision.preprocess import load_images
from cli_runner import cli_env, demo_chat_sampler, run_cli, without_compile_notices

CHAT_MAX_NEW_TOKENS = 8

# Gemma 3n E4B (docs/architecture.md §1): 35 layers, the first 20 own K/V; every fifth layer is global.
E4B_LAYERS = 35
E4B_TEXT_PARAMS = 6_834_711_280      # gemma3n_e4b_params.json without vision_encoder/ and mm_
E4B_VISION_PARAMS = 419_226_480      # its vision_encoder/ and embedder/mm_ entries
E4B_OWNER_LAYERS = 20
E4B_WINDOW = 512
E4B_KV_HEADS, E4B_HEAD_DIM = 2, 256
E4B_VOCAB, E4B_PER_LAYER_DIM = 262_144, 256
BFLOAT16_BYTES = 2
SMALL_IMAGE_SIZE = 112               # a small vision encoder's resolution (8 x 8 patches of 14)
END_INDEX_BYTES = 4                  # the cache's int32 end_index of one sequence


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """The subprocesses' environment: CPU, and one compilation cache for all of them."""
    return cli_env(tmp_path_factory)


def assert_one_line_error(result, *fragments, after_demo_notice=False):
    """The command failed with one `gemma3n: error:` line (after the demo's notice, if asked)."""
    assert result.returncode == cli.USAGE_ERROR, result
    assert result.stdout == ''
    assert 'Traceback' not in result.stderr
    lines = without_compile_notices(result.stderr).splitlines()
    if after_demo_notice:
        assert cli.DEMO_NOTICE.splitlines() == lines[:-1]
    else:
        assert len(lines) == 1, result.stderr
    assert lines[-1].startswith('gemma3n: error: '), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


@pytest.fixture(scope='module')
def demo_chat():
    """A ChatSampler of the demo model exactly as the command builds it (default cache)."""
    return demo_chat_sampler(DEFAULT_CACHE_LENGTH, CHAT_MAX_NEW_TOKENS)


def test_generate_default_runs_the_demo(env, demo_chat):
    result = run_cli(env, 'generate', 'Hello')
    assert result.returncode == 0, result.stderr
    assert without_compile_notices(result.stderr) == cli.DEMO_NOTICE + '\n'
    # Greedy decoding of the prompt in the turn format, with the sampler's text stop tokens.
    expected = demo_chat.sampler.sample(format_user_turn('Hello'),
                                        max_new_tokens=cli.DEMO_MAX_NEW_TOKENS)
    assert expected.strip()
    assert result.stdout == expected + '\n'


def test_generate_raw_verbose(env, demo_chat):
    result = run_cli(env, 'generate', '--raw', '-v', 'Hello')
    assert result.returncode == 0, result.stderr
    sampler = demo_chat.sampler
    expected = sampler.sample('Hello', max_new_tokens=cli.DEMO_MAX_NEW_TOKENS)
    assert result.stdout == expected + '\n'
    run = sampler.generation([demo_chat.tokenizer.encode('Hello', add_bos=True)],
                             cli.DEMO_MAX_NEW_TOKENS, stop_tokens=sampler.text_stop_tokens())
    for _ in run:
        pass
    num_tokens = int(run.output().lengths[0])
    assert 'random demo weights made in' in result.stderr
    assert f'gemma3n: {num_tokens} tokens in' in result.stderr


def test_chat_keeps_the_conversation_and_resets(env, demo_chat):
    messages = ['Hello', 'How are you?', '/reset', 'Hello']
    result = run_cli(env, 'chat', '--max-new-tokens', str(CHAT_MAX_NEW_TOKENS),
                     stdin='\n'.join(messages) + '\n')
    assert result.returncode == 0, result.stderr
    demo_chat.reset()
    first = demo_chat.chat('Hello')
    second = demo_chat.chat('How are you?')    # answered with the first turn in the cache
    assert first != second
    assert result.stdout == f'{first}\n{second}\n{first}\n'
    assert 'conversation reset' in result.stderr


def test_chat_quit_command_ends_it(env):
    result = run_cli(env, 'chat', '--max-new-tokens', '2', stdin='/quit\nHello\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout == ''


def test_info_e4b(env):
    context = 8192
    result = run_cli(env, 'info', '--model', 'e4b', '--context', str(context))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f'{E4B_LAYERS} layers' in out
    assert len([line for line in out.splitlines() if 'local sliding' in line]) == 28
    assert f'{E4B_TEXT_PARAMS:,}' in out
    assert f'{E4B_VISION_PARAMS:,}' in out
    assert f'{E4B_TEXT_PARAMS + E4B_VISION_PARAMS:,}' in out
    weights = (E4B_TEXT_PARAMS + E4B_VISION_PARAMS) * BFLOAT16_BYTES
    assert f'weights                    {weights:,} bytes' in out
    # Served from a checkpoint, the per-layer table [V, layers, P] stays in the file.
    served = weights - E4B_VOCAB * E4B_LAYERS * E4B_PER_LAYER_DIM * BFLOAT16_BYTES
    assert f'bfloat16                 {served:,} bytes' in out
    # Global owners (layers 4, 9, 14, 19) keep every position, local owners a window.
    num_global = E4B_OWNER_LAYERS // 5
    slots = num_global * context + (E4B_OWNER_LAYERS - num_global) * E4B_WINDOW
    kv_bytes = slots * 2 * E4B_KV_HEADS * E4B_HEAD_DIM * BFLOAT16_BYTES + END_INDEX_BYTES
    assert f'KV cache, 1 sequence of {context:,} positions: {kv_bytes:,} bytes' in out
    # A shared global layer reads the last global owner's K/V.
    assert '    24  global         layer 19' in out


def test_info_text_only_float32(env):
    result = run_cli(env, 'info', '--model', 'e4b', '--text-only', '--dtype', 'float32')
    assert result.returncode == 0, result.stderr
    assert 'none (text-only)' in result.stdout
    assert f'total                        {E4B_TEXT_PARAMS:,}' in result.stdout
    assert f'{E4B_TEXT_PARAMS * 4:,} bytes' in result.stdout


def test_missing_checkpoint(env, tmp_path):
    missing = tmp_path / 'no-such-checkpoint'
    assert_one_line_error(run_cli(env, 'generate', '--checkpoint', str(missing), 'Hi'),
                          'checkpoint not found', str(missing))


def test_checkpoint_without_tokenizer(env, tmp_path):
    assert_one_line_error(run_cli(env, 'chat', '--checkpoint', str(tmp_path)),
                          'no tokenizer.model in', '--tokenizer')


@pytest.mark.parametrize('options, fragment', [
    (['--max-new-tokens', '0'], 'must be at least 1'),
    (['--top-p', '1.5'], 'p must be in (0, 1]'),
    (['--top-k', '5', '--top-p', '0.5'], '--top-k or --top-p'),
    (['--model', 'e4b'], 'needs --checkpoint'),
])
def test_bad_options(env, options, fragment):
    assert_one_line_error(run_cli(env, 'generate', *options, 'Hi'), fragment)


def test_prompt_too_long_for_the_cache(env):
    assert_one_line_error(run_cli(env, 'generate', '--cache-length', '8', 'a prompt longer '
                                  'than eight tokens once it is in the turn format'),
                          'cache_length is 8', after_demo_notice=True)


def test_cache_too_large_for_the_memory(env):
    # The demo's cache of 10^8 positions and a prefill chunk against it need about 95 GiB.
    assert_one_line_error(run_cli(env, 'generate', '--cache-length', '100000000', 'Hi'),
                          'a KV cache of 100,000,000 positions', 'available',
                          'lower --cache-length or --prefill-chunk', after_demo_notice=True)


def test_generate_a_prompt_longer_than_the_default_cache(env, demo_chat):
    tokenizer, new = demo_chat.tokenizer, 4
    sentence = 'The quick brown fox jumps over the lazy dog. '
    per_sentence = len(tokenizer.encode(sentence * 100)) / 100
    prompt = sentence * int((DEFAULT_CACHE_LENGTH + 100) / per_sentence)
    ids = tokenizer.encode(format_user_turn(prompt), add_bos=True)
    assert len(ids) > DEFAULT_CACHE_LENGTH                   # the cache grows to fit it
    result = run_cli(env, 'generate', '--max-new-tokens', str(new), prompt)
    assert result.returncode == 0, result.stderr
    sampler = demo_chat.sampler
    long_cache = Sampler(model=sampler.model, params=sampler.params, tokenizer=tokenizer,
                         cache_length=cli.default_cache_length(len(ids) + new))
    assert result.stdout == long_cache.sample(format_user_turn(prompt), max_new_tokens=new) + '\n'


def test_default_cache_length():
    assert cli.default_cache_length(10) == DEFAULT_CACHE_LENGTH
    assert cli.default_cache_length(DEFAULT_CACHE_LENGTH) == DEFAULT_CACHE_LENGTH
    assert cli.default_cache_length(DEFAULT_CACHE_LENGTH + 1) == 2 * DEFAULT_CACHE_LENGTH


def test_sampling_method_of_options():
    assert cli.sampling_method(None, None, None) == Greedy()
    assert cli.sampling_method(0.0, None, None) == Greedy()
    assert cli.sampling_method(0.7, None, None) == RandomSampling(temperature=0.7)
    assert cli.sampling_method(None, 40, None) == TopkSampling(k=40, temperature=1.0)
    assert cli.sampling_method(0.5, None, 0.9) == TopPSampling(p=0.9, temperature=0.5)
    with pytest.raises(ValueError, match='temperature must be > 0'):
        cli.sampling_method(-1.0, None, None)


def test_image_markers():
    marker = special_tokens.START_OF_IMAGE_PIECE
    assert add_image_markers('Hi', 0) == 'Hi'
    assert add_image_markers('Compare.', 2) == f'{marker}{marker}Compare.'
    assert add_image_markers(f'A {marker} B', 1) == f'A {marker} B'
    with pytest.raises(ValueError, match='2 images'):
        add_image_markers(f'A {marker} B', 2)


def test_images_of_any_size_stack_as_the_encoder_sees_them(tmp_path):
    encoder = SigLiPFromPatches(
        siglip_encoder=ViTModel(width=32, depth=2, mlp_dim=64, num_heads=4),
        siglip_exit=VisionExit(output_length=4), num_mm_tokens_per_image_prepool=64,
        num_mm_tokens_per_image=4,
        image_height=SMALL_IMAGE_SIZE, image_width=SMALL_IMAGE_SIZE)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((90, 150, 3), (200, 64, 3))]
    paths = []
    for index, image in enumerate(pixels):
        paths.append(str(tmp_path / f'{index}.png'))
        Image.fromarray(image).save(paths[-1])
    pictures = cli.read_images(paths)
    for picture, image in zip(pictures, pixels):
        np.testing.assert_array_equal(picture, image)      # PNG is lossless
    stacked = load_images(paths, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE)[None]
    assert stacked.shape == (1, 2, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, 3)
    params = encoder.init(jax.random.key(0), stacked)
    together = encoder.apply(params, stacked)                           # [1, 2, 4, 32]
    for index, image in enumerate(pixels):
        alone = encoder.apply(params, image[None, None])                # resized by the encoder
        # Same arithmetic on the same pixels; only the batch of two may change float32 sums.
        np.testing.assert_allclose(together[0, index], alone[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_generate_from_a_checkpoint(env, demo_chat, tmp_path, dtype):
    # The demo's weights saved as a checkpoint: the command then loads them (lazy per-layer
    # table, serving layout) and must answer as the library does with the plain weights.
    save_params(demo_chat.sampler.params, tmp_path / 'model.safetensors')
    shutil.copy(default_tokenizer_path(), tmp_path / 'tokenizer.model')
    result = run_cli(env, 'generate', '--model', 'demo', '--dtype', dtype, '--checkpoint',
                     str(tmp_path / 'model.safetensors'), '--max-new-tokens', '12', 'Hello')
    assert result.returncode == 0, result.stderr
    model = demo_chat.sampler.model.clone(dtype=getattr(jnp, dtype))
    params = jax.tree.map(lambda x: jnp.asarray(x, getattr(jnp, dtype)), demo_chat.sampler.params)
    expected = Sampler(model=model, params=params, tokenizer=demo_chat.tokenizer).sample(
        format_user_turn('Hello'), max_new_tokens=12)
    assert result.stdout == expected + '\n'


@pytest.mark.parametrize('option,leaf_type', [('--int8', QuantizedWeight),
                                               ('--int4', Int4Weight)])
def test_generate_quantized(env, demo_chat, tmp_path, option, leaf_type):
    # --int8 and --int4 quantize while loading (gemma3n.layout.load_serving); the answer must
    # be the one the library gives with the same weights quantized in memory.
    save_params(demo_chat.sampler.params, tmp_path / 'model.safetensors')
    shutil.copy(default_tokenizer_path(), tmp_path / 'tokenizer.model')
    result = run_cli(env, 'generate', '--model', 'demo', '--dtype', 'float32', option, '--checkpoint',
                     str(tmp_path / 'model.safetensors'), '--max-new-tokens', '12', 'Hello')
    assert result.returncode == 0, result.stderr
    model, params = to_serving(demo_chat.sampler.model, demo_chat.sampler.params,
                               quantize_int8=option == '--int8', quantize_int4=option == '--int4')
    assert any(isinstance(leaf, leaf_type) for leaf in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, leaf_type)))
    expected = Sampler(model=model, params=params, tokenizer=demo_chat.tokenizer).sample(
        format_user_turn('Hello'), max_new_tokens=12)
    assert result.stdout == expected + '\n'
