"""The command with a released-towers checkpoint (issue 16): a small random
`Gemma3nForConditionalGeneration` saved with `save_pretrained` (released_oracle.py) answers
`--image` and `--audio` prompts, bad audio input gets one clear line, and `info` lists the
towers."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
from PIL import Image
from safetensors import safe_open

from cli_runner import assert_usage_error, cli_env, run_cli
from gemma3n.checkpoints.hf_towers import TOWER_PREFIXES
from released_oracle import make_hf_model, save_checkpoint
from tokenizer_files import released_layout
from test_audio_features import tone_and_noise

CD_RATE = 44_100


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    return cli_env(tmp_path_factory)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp('released_cli')
    checkpoint = directory / 'checkpoint'
    save_checkpoint(make_hf_model(seed=2), checkpoint)
    image = directory / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), np.uint8)).save(image)
    clip = directory / 'speech.wav'
    soundfile.write(clip, tone_and_noise(0.8, CD_RATE, channels=2), CD_RATE)
    long_clip = directory / 'long.wav'
    soundfile.write(long_clip, tone_and_noise(31, 16_000), 16_000, subtype='PCM_16')
    not_audio = directory / 'notes.wav'
    not_audio.write_text('not audio at all')
    empty = directory / 'empty.wav'
    empty.write_bytes(b'')
    # A tokenizer laid out like the released one (256000 is <start_of_audio>, not <end_of_image>).
    tokenizer = released_layout(directory / 'tokenizer.model')
    return dict(checkpoint=checkpoint, image=image, clip=clip, long=long_clip,
                not_audio=not_audio, empty=empty, tokenizer=tokenizer)


def _run(env, files, *extra):
    return run_cli(env, 'generate', '--checkpoint', str(files['checkpoint']), '--tokenizer',
                   str(files['tokenizer']), '--dtype', 'float32', '--max-new-tokens', '3',
                   *extra, 'Describe what you see and hear.')


def test_generate_answers_image_and_audio_prompts(env, files):
    result = _run(env, files, '--image', str(files['image']), '--audio', str(files['clip']))
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith('\n') and 'Traceback' not in result.stderr


@pytest.mark.parametrize('which, fragments', [
    ('not_audio', ('notes.wav', 'not an audio file')),
    ('empty', ('empty.wav', 'empty file')),
])
def test_bad_audio_is_one_line(env, files, which, fragments):
    assert_usage_error(_run(env, files, '--audio', str(files[which])), *fragments)


def test_audio_without_an_audio_tower_is_one_line(env):
    result = run_cli(env, 'generate', '--audio', 'x.wav', 'Hi')
    assert_usage_error(result, 'demo model is text-only', '--audio')


def test_too_long_audio_says_what_is_kept(env, files):
    # The tower of this small checkpoint takes 8 soft tokens per clip (under 1 s): the 30 s the
    # file reader keeps are still too many, and the command says so in one line.
    result = _run(env, files, '--audio', str(files['long']))
    lines = result.stderr.splitlines()
    assert any('31.0 s long' in line and 'keeping the first 30 s' in line for line in lines)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert 'audio soft tokens' in lines[-1] and 'takes 8 per clip' in lines[-1]


def test_info_lists_the_towers_and_their_sizes(env, files):
    result = run_cli(env, 'info', '--checkpoint', str(files['checkpoint']), '--dtype', 'float32')
    assert result.returncode == 0, result.stderr
    with safe_open(files['checkpoint'] / 'model.safetensors', 'np') as stored:
        sizes = {prefix: sum(int(np.prod(stored.get_slice(key).get_shape()))
                             for key in stored.keys() if key.startswith(prefix))
                 for prefix in TOWER_PREFIXES}
    lines = result.stdout.splitlines()
    titles = ('vision tower (MobileNet-V5)', 'vision embedder', 'audio tower (conformer)',
              'audio embedder')                     # in the order of TOWER_PREFIXES
    for title, prefix in zip(titles, TOWER_PREFIXES):
        line = next(line for line in lines if line.strip().startswith(title))
        assert line.split()[-1] == f'{sizes[prefix]:,}', line
