"""Every input is checked before it is narrowed, cast or replaced by a default (issue 12, class 3).

Python API and command line. Checks that must come before any work also assert that nothing
was compiled (`Sampler.num_traces`).
"""


import jax
import numpy as np
import pytest

from gemma3n import validation
from gemma3n.checkpoints import hf_mapping
from gemma3n.text import special_tokens
from gemma3n.text.chat import ChatSampler
from gemma3n.text.chat_format import format_user_turn
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH, DEFAULT_TEXT_STOP_TOKENS, Sampler
from gemma3n.engine.sampling import RandomSampling, TopkSampling, TopPSampling
from cli_runner import assert_usage_error, cli_env, demo_model, run_cli

HUGE_SEED = 1180591620717411303424          # 2**70: the seed of the issue
NEW_TOKENS = 3


@pytest.fixture(scope='module')
def demo():
    """The demo model and its tokenizer as the command builds them (float32, default cache)."""
    model, params, tokenizer = demo_model()
    return Sampler(model=model, params=params, tokenizer=tokenizer,
                   cache_length=DEFAULT_CACHE_LENGTH)


def unchanged_traces(sampler):
    """A context that asserts the sampler compiled nothing inside it."""
    class Guard:
        def __enter__(self):
            self.before = dict(sampler.num_traces)

        def __exit__(self, *exc):
            assert sampler.num_traces == self.before
    return Guard()


# ---- integers in their own width -------------------------------------------------------------

@pytest.mark.parametrize('prompt, shown', [
    ([[2, 2 ** 32 + 5]], '4294967301'),                      # wrapped to token 5 before
    (np.array([[2, 2 ** 32 + 5]], np.int64), '4294967301'),
    (np.array([[2, 2 ** 63]], np.uint64), '9223372036854775808'),
    ([[2, 2 ** 70]], str(2 ** 70)),                           # beyond 64 bits
    ([[2, -1]], '-1'),
])
def test_token_ids_are_checked_before_the_int32_cast(demo, prompt, shown):
    with unchanged_traces(demo), pytest.raises(ValueError, match=f'token id {shown} .*outside'):
        demo.sample_tokens(prompt, NEW_TOKENS)


@pytest.mark.parametrize('rng, message', [
    (HUGE_SEED, 'must be in \\[0, 4294967295\\]'),             # OverflowError before
    (2 ** 32, 'must be in'),                                  # the same key as seed 0 before
    (-1, 'must be in'),                                       # the same key as 2**32 - 1 before
])
def test_seeds_out_of_range_are_errors(demo, rng, message):
    with unchanged_traces(demo), pytest.raises(ValueError, match=message):
        demo.sample_tokens([[2, 3]], NEW_TOKENS, rng=rng)


def test_distinct_seeds_give_distinct_keys():
    top = validation.max_seed()
    keys = [jax.random.key_data(validation.as_rng(seed)).tolist() for seed in (0, 1, top)]
    assert len({tuple(k) for k in keys}) == 3


@pytest.mark.parametrize('rng', ['7', 7.0, True, np.zeros(2, np.int32),
                                 jax.random.split(jax.random.key(0)), [1, 2]])
def test_rng_must_be_a_seed_or_a_key(demo, rng):
    with unchanged_traces(demo), pytest.raises(TypeError) as error:
        demo.sample_tokens([[2, 3]], NEW_TOKENS, rng=rng)
    message = str(error.value)
    assert message.startswith('rng must be an int seed or a JAX key') and '\n' not in message


def test_a_seed_and_its_key_sample_alike(demo):
    sampling = RandomSampling(temperature=1.0)
    by_seed = demo.sample_tokens([[2, 3]], NEW_TOKENS, rng=123, sampling=sampling)
    by_key = demo.sample_tokens([[2, 3]], NEW_TOKENS, rng=jax.random.key(123), sampling=sampling)
    by_raw_key = demo.sample_tokens([[2, 3]], NEW_TOKENS, rng=jax.random.PRNGKey(123),
                                    sampling=sampling)
    np.testing.assert_array_equal(by_seed.tokens, by_key.tokens)
    np.testing.assert_array_equal(by_seed.tokens, by_raw_key.tokens)


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(max_new_tokens=2 ** 40), ValueError, 'max_new_tokens must be in \\[1, 2147483647\\]'),
    (dict(max_new_tokens=2.5), TypeError, 'max_new_tokens must be an integer'),
    (dict(max_new_tokens=True), TypeError, 'max_new_tokens must be an integer, got bool'),
    (dict(max_new_tokens=3, sampling='greedy'), TypeError, 'sampling must be a sampling method'),
])
def test_lengths_and_methods_of_a_call(demo, kwargs, error, message):
    with unchanged_traces(demo), pytest.raises(error, match=message):
        demo.sample_tokens([[2, 3]], **kwargs)


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(cache_length=2 ** 40), ValueError, 'cache_length must be in'),
    (dict(cache_length=64.0), TypeError, 'cache_length must be an integer'),
    (dict(max_out_length=0), ValueError, 'max_out_length must be in'),
    (dict(stop_tokens=(5000,)), ValueError, 'stop_tokens has token id 5000 .*\\[0, 4096\\)'),
    (dict(stop_tokens=(2 ** 40,)), ValueError, 'stop_tokens has token id 1099511627776'),
    (dict(stop_tokens=(1.5,)), TypeError, 'stop_tokens must hold integer token ids'),
    (dict(stop_tokens=106), TypeError, 'stop_tokens must be a sequence of token ids'),
    # -1 would have forbidden the last token of the vocabulary (negative index), silently.
    (dict(forbidden_tokens=(-1,)), ValueError, 'forbidden_tokens has token id -1'),
])
def test_sampler_arguments(demo, kwargs, error, message):
    with pytest.raises(error, match=message):
        Sampler(model=demo.model, params=demo.params, **kwargs)


def test_stop_tokens_of_a_call_are_checked(demo):
    with unchanged_traces(demo), pytest.raises(ValueError, match='stop_tokens has token id 9999'):
        demo.generation([[2, 3]], NEW_TOKENS, stop_tokens=(9999,))


@pytest.mark.parametrize('make, error, message', [
    (lambda: RandomSampling(temperature=float('inf')), ValueError, 'finite'),
    (lambda: RandomSampling(temperature=float('nan')), ValueError, 'temperature'),
    (lambda: RandomSampling(temperature='hot'), TypeError, 'temperature must be a number'),
    (lambda: TopkSampling(k=2.5), TypeError, 'k must be an integer'),
    (lambda: TopkSampling(k=2 ** 40), ValueError, 'k must be in'),
    (lambda: TopPSampling(p=None), TypeError, 'p must be a number'),
])
def test_sampling_parameters(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_decode_refuses_fractional_ids(demo):
    with pytest.raises(TypeError, match='integer token ids, got float'):
        demo.tokenizer.decode([2, 2.7])


# ---- explicit arguments are honoured, never replaced by a default ----------------------------

def test_zero_new_tokens_is_an_error_not_the_default(demo):
    # `max_new_tokens or default` turned 0 into 256 tokens.
    with unchanged_traces(demo), pytest.raises(ValueError, match='max_new_tokens must be in'):
        demo.sample('Hi', max_new_tokens=0)
    chat = ChatSampler(model=demo.model, params=demo.params, tokenizer=demo.tokenizer,
                       cache_length=64)
    with pytest.raises(ValueError, match='max_new_tokens must be in'):
        chat.chat('Hi', max_new_tokens=0)


def test_text_stop_tokens_keep_the_defaults_unless_replaced(demo):
    extra = 7
    model, params = demo.model, demo.params
    assert Sampler(model=model, params=params).text_stop_tokens() == DEFAULT_TEXT_STOP_TOKENS
    # Before, any stop_tokens replaced EOS and <end_of_turn> in text generation.
    added = Sampler(model=model, params=params, stop_tokens=(extra,))
    assert added.text_stop_tokens() == (*DEFAULT_TEXT_STOP_TOKENS, extra)
    assert added.strip_stop([5, special_tokens.EOS]) == [5]
    assert added.strip_stop([5, extra]) == [5]
    replaced = Sampler(model=model, params=params, stop_tokens=(extra,),
                       keep_default_stop_tokens=False)
    assert replaced.text_stop_tokens() == (extra,)
    assert replaced.strip_stop([5, special_tokens.EOS]) == [5, special_tokens.EOS]
    # An explicit empty list with the defaults off: only the length ends the text.
    none = Sampler(model=model, params=params, keep_default_stop_tokens=False)
    assert none.text_stop_tokens() == ()


def test_empty_image_list_means_no_images(demo):
    # The demo model has no vision encoder: an empty list is honoured as "no images".
    with_empty = demo.sample('Hi', images=[], max_new_tokens=NEW_TOKENS)
    assert with_empty == demo.sample('Hi', max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize('hf_config, message', [
    ({'layer_types': []}, 'layer_types has 0 entries, num_hidden_layers is 35'),
    ({'activation_sparsity_pattern': []}, 'activation_sparsity_pattern has 0 entries'),
])
def test_explicit_empty_hf_config_lists_are_not_replaced_by_defaults(hf_config, message):
    with pytest.raises(ValueError, match=message):
        hf_mapping.config_from_hf(hf_config)


# ---- prompt shapes ---------------------------------------------------------------------------

def test_a_flat_prompt_list_is_one_sequence(demo):
    batch = demo.sample_tokens([[2, 17, 42]], NEW_TOKENS)
    for flat in ([2, 17, 42], np.array([2, 17, 42]), (np.int64(2), 17, 42)):
        out = demo.sample_tokens(flat, NEW_TOKENS)
        np.testing.assert_array_equal(out.tokens, batch.tokens)


@pytest.mark.parametrize('prompt, error, message', [
    ([[2, 3], 4], TypeError, 'a list of token-id lists.* or one list of token ids'),
    ('Hello', TypeError, 'got text'),
    ([], ValueError, 'holds no sequence'),
    (np.zeros((1, 2, 3), np.int32), ValueError, 'shape \\(1, 2, 3\\)'),
    ([[2, True]], TypeError, 'got bool'),
])
def test_malformed_prompts(demo, prompt, error, message):
    with unchanged_traces(demo), pytest.raises(error, match=message):
        demo.sample_tokens(prompt, NEW_TOKENS)


# ---- the command line ------------------------------------------------------------------------

@pytest.fixture(scope='module')
def env(tmp_path_factory):
    return cli_env(tmp_path_factory)




@pytest.mark.parametrize('options, fragments', [
    (['--seed', str(HUGE_SEED)], ['--seed', 'must be in [0, 4294967295]', str(HUGE_SEED)]),
    (['--seed', '-1'], ['--seed', 'must be at least 0']),
    (['--seed', str(2 ** 32)], ['--seed', 'must be in [0, 4294967295]']),
    (['--max-new-tokens', str(2 ** 40)], ['--max-new-tokens', 'must be in [1, 2147483647]']),
    (['--cache-length', str(2 ** 31)], ['--cache-length', 'must be in [1, 2147483647]']),
    (['--top-k', '2.5'], ['--top-k', 'expected a whole number']),
    (['--temperature', 'inf'], ['temperature must be > 0 and finite']),
])
def test_command_line_numbers_are_checked(env, options, fragments):
    assert_usage_error(run_cli(env, 'generate', *options, 'Hi'), *fragments)


def test_command_line_honours_the_largest_seed(env, demo):
    seed = validation.max_seed()
    result = run_cli(env, 'generate', '--temperature', '1', '--seed', str(seed),
                     '--max-new-tokens', '6', 'Hi')
    assert result.returncode == 0, result.stderr
    expected = demo.sample(format_user_turn('Hi'), max_new_tokens=6, rng=seed,
                           sampling=RandomSampling(temperature=1.0))
    assert result.stdout == expected + '\n'
