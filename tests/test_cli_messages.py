"""The command speaks to command-line users: options named, chat commands, model size from
config.json, and no message that suggests a Python call.

Answers are compared with the library's own (greedy unless a test samples with a seed).
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from gemma3n import cli
from gemma3n.checkpoints import hf_mapping
from gemma3n import loading
from gemma3n.checkpoints import open_checkpoint
from gemma3n.models import e2b_config, e4b_config
from gemma3n.text.chat_format import format_user_turn
from gemma3n.text.sampler import Sampler
from gemma3n.engine.sampling import RandomSampling
from gemma3n.text.tokenizer import default_tokenizer_path
from test_cli import assert_one_line_error, demo_chat, env, run_cli  # noqa: F401 (fixtures)

MAX_NEW_TOKENS = 6
PYTHON_CALL_HINTS = ('apply_hf_softcap', 'text_only=', 'reset()', 'model=', '(model')


def assert_no_python_call(text):
    for hint in PYTHON_CALL_HINTS:
        assert hint not in text, text


# --- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize('argv, fragments', [
    (['--bogus'], ['unknown option --bogus']),                        # today: "COMMAND required"
    (['--checkpoint', 'x', 'generate', 'Hi'],
     ['unknown option --checkpoint', 'after the command', 'gemma3n generate --checkpoint']),
    (['generate', '--tempreture', '1', 'Hi'],
     ['unknown option --tempreture', 'did you mean --temperature?', 'gemma3n generate --help']),
    (['generate', 'Why', 'is', 'the', 'sky', 'blue?'],
     ["unexpected arguments 'is the sky blue?'", 'quote']),
    (['info', '--bogus=3'], ['unknown option --bogus=3', 'gemma3n info --help']),
])
def test_unknown_options_and_stray_words_are_named(env, argv, fragments):
    assert_one_line_error(run_cli(env, *argv), *fragments)


# --- chat commands -----------------------------------------------------------------------------

def test_chat_help_and_unknown_commands(env, demo_chat):
    stdin = '/help\n/bogus now\n/reset please\n//etc/hosts\nHello\n'
    result = run_cli(env, 'chat', '--max-new-tokens', str(MAX_NEW_TOKENS), stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert cli.CHAT_HELP in result.stderr
    for command in cli.CHAT_COMMANDS:
        assert f'gemma3n: {command} ' in cli.CHAT_HELP
    assert 'gemma3n: /bogus is no command: /help lists them\n' in result.stderr
    assert 'gemma3n: /reset takes nothing after it\n' in result.stderr
    # /bogus and /reset please went nowhere; //etc/hosts went to the model as /etc/hosts.
    demo_chat.reset()
    expected = [demo_chat.chat('/etc/hosts', max_new_tokens=MAX_NEW_TOKENS),
                demo_chat.chat('Hello', max_new_tokens=MAX_NEW_TOKENS)]
    assert result.stdout == ''.join(f'{answer}\n' for answer in expected)


def test_a_full_conversation_names_the_option_and_the_command(env):
    stdin = 'Hello\nHow are you?\nTell me more about it.\n'
    result = run_cli(env, 'chat', '--cache-length', '40', '--max-new-tokens', '8', stdin=stdin)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if 'no longer fits' in line]
    assert 'type /reset to start over, or run again with a larger --cache-length' in line
    assert_no_python_call(result.stderr)


# --- the model of a checkpoint -----------------------------------------------------------------

def hf_directory(path, config, params=None):
    """A Hugging Face style checkpoint folder: config.json, weights (or a stand-in), tokenizer."""
    path.mkdir()
    (path / 'config.json').write_text(json.dumps(
        {'model_type': 'gemma3n', 'text_config': hf_mapping.hf_text_config(config)}))
    weights = ({'unused': np.zeros(1, np.float32)} if params is None
               else hf_mapping.params_to_hf(params, config, prefix='model.language_model.'))
    save_file(weights, str(path / 'model.safetensors'))
    shutil.copy(default_tokenizer_path(), path / 'tokenizer.model')
    return path


@pytest.mark.parametrize('make_config, name', [(e4b_config, 'e4b'), (e2b_config, 'e2b')])
def test_the_size_comes_from_config_json(tmp_path, make_config, name):
    # Shapes only: the weights are not read to choose the model.
    path = hf_directory(tmp_path / name, make_config(with_vision=False))
    chosen, model = loading.checkpoint_model(open_checkpoint(path))
    assert chosen == name
    assert model.config == make_config(with_vision=False) and model.text_only


def test_a_model_that_does_not_fit_config_json_is_named_in_short(env, tmp_path):
    path = hf_directory(tmp_path / 'e4b', e4b_config(with_vision=False))
    result = run_cli(env, 'generate', '--checkpoint', str(path), '--model', 'e2b', 'Hi')
    # Today: one long line with two 35-element lists.
    assert_one_line_error(result, '--model e2b does not fit', 'num_hidden_layers=35, expected 30',
                          'intermediate_size=16384, expected 8192',
                          'num_kv_shared_layers=15, expected 10', 'Leave --model out')
    assert '[' not in result.stderr and len(result.stderr) < 400


def test_a_per_layer_difference_names_its_first_layer():
    config = e4b_config(with_vision=False)
    hub = hf_mapping.hf_text_config(config)
    hub['layer_types'] = ['sliding_attention'] * config.num_layers
    assert hf_mapping.check_hf_config(hub, config) == [
        "layer_types='sliding_attention' at layer 4 (and 6 more layers), expected 'full_attention'"]


@pytest.fixture(scope='module')
def demo_hf_checkpoint(tmp_path_factory, demo_chat):
    """The demo's weights as a Hugging Face checkpoint whose config.json is no preset size."""
    sampler = demo_chat.sampler
    return hf_directory(tmp_path_factory.mktemp('hf') / 'demo', sampler.model.config,
                        sampler.params)


def sampled(demo_chat, softcap, seed):
    """What the library samples for 'Hello' at temperature 1 with `seed` and final `softcap`."""
    model = demo_chat.sampler.model
    model = model.clone(config=dataclasses.replace(model.config, final_logit_softcap=softcap))
    sampler = Sampler(model=model, params=demo_chat.sampler.params, tokenizer=demo_chat.tokenizer)
    return sampler.sample(format_user_turn('Hello'), max_new_tokens=MAX_NEW_TOKENS,
                          sampling=RandomSampling(temperature=1.0), rng=seed)


def test_generate_from_config_json_and_the_softcap_option(env, demo_chat, demo_hf_checkpoint):
    common = ('generate', '--checkpoint', str(demo_hf_checkpoint), '--dtype', 'float32',
              '--max-new-tokens', str(MAX_NEW_TOKENS), '--temperature', '1', '--seed', '3')
    plain = run_cli(env, *common, 'Hello')
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == sampled(demo_chat, None, 3) + '\n'
    # Today: "... build the model with gemma3n.checkpoints.apply_hf_softcap(model, path)."
    [note] = [line for line in plain.stderr.splitlines() if 'final logits' in line]
    assert 'caps the final logits at 30.0' in note and 'pass --hf-softcap' in note
    assert_no_python_call(plain.stderr)
    capped = run_cli(env, *common, '--hf-softcap', 'Hello')
    assert capped.returncode == 0, capped.stderr
    assert 'final logits' not in capped.stderr
    assert capped.stdout == sampled(demo_chat, hf_mapping.HF_DEFAULT_FINAL_LOGIT_SOFTCAP, 3) + '\n'


def test_an_image_for_a_checkpoint_without_vision_names_the_option(env, demo_hf_checkpoint,
                                                                    tmp_path):
    image = tmp_path / 'red.png'
    Image.new('RGB', (8, 8), 'red').save(image)
    result = run_cli(env, 'generate', '--checkpoint', str(demo_hf_checkpoint),
                     '--image', str(image), 'Describe it.')
    assert_one_line_error(result, '--image needs a checkpoint with a vision encoder (SigLIP, or the released MobileNet-V5 tower)')
    assert_no_python_call(result.stderr)
