"""Image files are checked before they are decoded (issue 12, class 4): Python API and command.

Decompression bombs are PNG files that declare a huge size in their header and hold one small
compressed block: decoding one would fail (truncated), so an error that names the size proves
the header was judged before any decoding.
"""

import dataclasses
import struct
import warnings
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gemma3n import save_params
from gemma3n.text.sampler import Sampler
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
from gemma3n.transformer import Gemma3nTransformer
from gemma3n.vision import SigLiPFromPatches, ViTModel, VisionExit
from gemma3n.vision.preprocess import MAX_IMAGE_PIXELS, image_file_size, load_image, load_images
from cli_runner import cli_env, run_cli, assert_usage_error
from hf_oracle import small_configs
from tokenizer_files import released_layout

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
RGB_8BIT = (8, 2, 0, 0, 0)         # IHDR: bit depth, colour type (RGB), compression, filter, interlace


def png_header(path, width, height):
    """A PNG declaring width x height RGB pixels whose data is a few compressed zero bytes."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    ihdr = struct.pack('>II5B', width, height, *RGB_8BIT)
    path.write_bytes(PNG_SIGNATURE + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
                     + chunk(b'IEND', b''))
    return path


@pytest.fixture
def files(tmp_path):
    """Named image files: bombs of several sizes, a directory, garbage, a truncated PNG, a good one."""
    good = tmp_path / 'good.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)).save(good)
    truncated = tmp_path / 'truncated.png'
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    (tmp_path / 'photos.png').mkdir()
    (tmp_path / 'notes.png').write_text('not an image')
    return dict(
        good=good, truncated=truncated, directory=tmp_path / 'photos.png',
        garbage=tmp_path / 'notes.png', missing=tmp_path / 'missing.png',
        bomb_30k=png_header(tmp_path / 'bomb_30k.png', 30000, 30000),    # over Pillow's error limit
        bomb_10k=png_header(tmp_path / 'bomb_10k.png', 10000, 10000),    # over Pillow's warning limit
        over_ours=png_header(tmp_path / 'over.png', 8000, 7000),         # under Pillow's, over ours
        at_limit=png_header(tmp_path / 'at_limit.png', 10000, MAX_IMAGE_PIXELS // 10000))


@pytest.mark.parametrize('name, error, fragments', [
    ('bomb_30k', ValueError, ['bomb_30k.png', '(69 bytes)', '900,000,000 pixels', f'{MAX_IMAGE_PIXELS:,}']),
    ('bomb_10k', ValueError, ['bomb_10k.png', '10000x10000 = 100,000,000 pixels']),
    ('over_ours', ValueError, ['over.png', '8000x7000 = 56,000,000 pixels']),
    ('directory', IsADirectoryError, ['photos.png', 'is a directory']),
    ('missing', FileNotFoundError, ['missing.png', 'not found']),
    ('garbage', ValueError, ['cannot read image file', 'notes.png']),
])
def test_files_are_refused_from_their_header(files, name, error, fragments):
    for read in (image_file_size, load_image, lambda path: load_images([files['good'], path])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            with pytest.raises(error) as raised:
                read(files[name])
        message = str(raised.value)
        assert '\n' not in message
        assert all(fragment in message for fragment in fragments), message
        assert not caught, [str(w.message) for w in caught]       # no raw Pillow warning


def test_a_file_that_fails_to_decode_is_named(files):
    assert image_file_size(files['truncated']) == (60, 40)          # the header is fine
    with pytest.raises(ValueError, match="cannot read image file '.*truncated.png'"):
        load_image(files['truncated'])


def test_the_pixel_limit_is_inclusive(files):
    width, height = image_file_size(files['at_limit'])
    assert width * height == MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match='cannot read image file'):   # decoded, then truncated
        load_image(files['at_limit'])


def test_good_files_still_load(files):
    assert load_image(files['good']).shape == (40, 60, 3)
    assert load_images(str(files['good']), 28, 28).shape == (1, 28, 28, 3)   # one path alone


def vision_sampler(tokenizer_path=None):
    """A sampler of a small model with a vision encoder; no weights are needed to refuse files."""
    encoder = SigLiPFromPatches(siglip_encoder=ViTModel(width=32, depth=2, mlp_dim=64, num_heads=4),
                                siglip_exit=VisionExit(output_length=4),
                                num_mm_tokens_per_image_prepool=64, num_mm_tokens_per_image=4,
                                image_height=112, image_width=112)
    config = dataclasses.replace(small_configs()[0], vision_encoder=encoder)
    return Sampler(model=Gemma3nTransformer(config=config, dtype=jnp.float32), params={},
                   tokenizer=Tokenizer(tokenizer_path or default_tokenizer_path()))


def test_the_sampler_checks_every_header_first(files):
    sampler = vision_sampler()
    with pytest.raises(ValueError, match='bomb_30k.png'):
        sampler.sample('Describe it.', images=[files['good'], files['bomb_30k']])
    with pytest.raises(IsADirectoryError, match='is a directory'):
        sampler.prompt_images(['a', 'b'], [[files['good']], [files['directory']]], single=False)
    with pytest.raises(ValueError, match=r'\[1, 2\] images: every prompt of a batch'):
        sampler.prompt_images(['a', 'b'], [[files['good']], [files['good']] * 2], single=False)


def test_a_text_only_model_refuses_images_before_decoding(files):
    tokenizer = Tokenizer(default_tokenizer_path())
    model = Gemma3nTransformer(config=small_configs()[0], text_only=True, dtype=jnp.float32)
    sampler = Sampler(model=model, params={}, tokenizer=tokenizer)
    for image in (files['garbage'], files['bomb_30k']):
        with pytest.raises(ValueError, match='does not have vision encoder'):
            sampler.sample('Describe it.', images=[image])


def test_a_tokenizer_without_the_siglip_image_ids_refuses_images_before_decoding(files, tmp_path):
    # The released vocabulary gives 256000 to <start_of_audio>: SigLIP image blocks cannot be said.
    sampler = vision_sampler(released_layout(tmp_path / 'released.model'))
    with pytest.raises(ValueError, match='does not speak <start_of_image> and <end_of_image> as '
                                         '255999 and 256000'):
        sampler.sample('Describe it.', images=[files['garbage']])


# ---- the command line ------------------------------------------------------------------------

@pytest.fixture(scope='module')
def env(tmp_path_factory):
    return cli_env(tmp_path_factory)




@pytest.fixture
def vision_checkpoint(tmp_path):
    """A file in our format that holds vision encoder parameters (its header is all the command
    reads before the images)."""
    path = tmp_path / 'vision.safetensors'
    save_params({'vision_encoder': {'siglip_encoder': {'w': np.zeros(4, np.float32)}}}, path)
    return path


@pytest.mark.parametrize('name, fragments', [
    ('bomb_30k', ['bomb_30k.png', '900,000,000 pixels']),
    ('bomb_10k', ['bomb_10k.png', '10000x10000']),
    ('over_ours', ['over.png', '8000x7000']),
    ('directory', ['photos.png', 'is a directory']),
    ('missing', ['missing.png', 'not found']),
    ('garbage', ['cannot read image file', 'notes.png']),
    ('truncated', ['cannot read image file', 'truncated.png']),
])
def test_command_refuses_bad_image_files(env, files, vision_checkpoint, name, fragments):
    result = run_cli(env, 'generate', '--checkpoint', str(vision_checkpoint), '--image',
                     str(files['good']), '--image', str(files[name]), 'Describe it.')
    assert_usage_error(result, *fragments)


def test_command_refuses_images_for_a_model_without_vision(env, files, vision_checkpoint, tmp_path):
    # The garbage file would fail to decode: the model's refusal proves nothing was decoded.
    image = ['--image', str(files['garbage'])]
    assert_usage_error(run_cli(env, 'generate', *image, 'Hi'), 'the demo model is text-only')
    assert_usage_error(run_cli(env, 'chat', '--text-only', '--checkpoint', str(vision_checkpoint),
                               *image), '--text-only leaves out')
    hf = tmp_path / 'hf'
    hf.mkdir()
    (hf / 'model.safetensors').write_bytes(b'')                        # recognised by name only
    assert_usage_error(run_cli(env, 'generate', '--checkpoint', str(hf), *image, 'Hi'),
                       'a vision encoder (SigLIP, or the released MobileNet-V5 tower)', 'Hugging Face format')
