"""Images in prompts: token expansion, positions, masks, output length, and generation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gemma3n import Gemma3nTransformer, Sampler
from gemma3n import multimodal
from gemma3n.attention import KVContext, QueryInfo, attention_mask
from gemma3n.config import AttentionType
from gemma3n.layers import special_ids as sid
from gemma3n.text import special_tokens as st
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
from gemma3n.vision import SigLiPFromPatches, ViTModel, VisionExit
from gemma3n.vision.preprocess import load_images
from hf_oracle import small_configs

SOFT = 4                                   # soft tokens per image of the small encoder
BLOCK = SOFT + 4
SOI = sid.START_OF_IMAGE
IMAGE_SIZE = 112
VIT_WIDTH = 48                             # not the text width (32): the projection changes it


def small_vision():
    return SigLiPFromPatches(
        siglip_encoder=ViTModel(width=VIT_WIDTH, depth=2, mlp_dim=64, num_heads=4),
        siglip_exit=VisionExit(output_length=SOFT), num_mm_tokens_per_image_prepool=64,
        num_mm_tokens_per_image=SOFT, image_height=IMAGE_SIZE, image_width=IMAGE_SIZE)


@pytest.fixture(scope='module')
def mm():
    cfg = dataclasses.replace(small_configs()[0], vision_encoder=small_vision(),
                              sliding_window_size=16)
    model = Gemma3nTransformer(config=cfg, dtype=jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))['params']
    return cfg, model, params


@pytest.fixture(scope='module')
def mm_apply(mm):
    """The small model's logits, jitted once for the module: fn(tokens, images, last_only)."""
    _, model, params = mm
    logits = jax.jit(lambda p, t, im, last: model.apply({'params': p}, t, images=im,
                                                        return_last_only=last).logits,
                     static_argnums=3)
    return lambda tokens, imgs, last: np.asarray(logits(params, tokens, imgs, last))


def images(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def reference_rows(tokens):
    """[B, L] -> [B, L]: the reference's `remove_mm_logits` rule, written out on its own.

    Text position i reads row i + (SOFT + 3) * (markers before i) of the expanded sequence: a
    marker reads the first row of its own block (the "\\n\\n" in front of the image).
    """
    tokens = np.asarray(tokens)
    markers_before = np.cumsum(tokens == SOI, axis=-1) - (tokens == SOI)
    return np.arange(tokens.shape[-1]) + (SOFT + 3) * markers_before


def test_expand_tokens_positions_and_text_index():
    tokens = jnp.array([[2, 10, SOI, 11, 12, 0], [2, SOI, 13, SOI, 14, 15]])
    # Second row has two markers: expand with N=2 requires the same count per row.
    exp, text_index, start = multimodal.expand_tokens(tokens[1:], 2, SOFT)
    block = multimodal.block_tokens(SOFT).tolist()
    assert exp[0].tolist() == [2] + block + [13] + block + [14, 15]
    assert start[0].tolist() == [1, 2 + BLOCK]
    # Each marker reads its block's first row, where the reference reads it.
    assert text_index[0].tolist() == [0, 1, 1 + BLOCK, 2 + BLOCK, 2 + 2 * BLOCK, 3 + 2 * BLOCK]
    assert text_index.tolist() == reference_rows(tokens[1:]).tolist()
    exp1, _, start1 = multimodal.expand_tokens(tokens[:1], 1, SOFT)
    assert exp1[0].tolist() == [2, 10] + block + [11, 12, 0]
    assert start1[0].tolist() == [2]


def test_bidirectional_only_inside_the_placeholder_run():
    tokens, _, _ = multimodal.expand_tokens(jnp.array([[2, 10, SOI, 11]]), 1, SOFT)
    positions = jnp.arange(tokens.shape[1])[None]
    visible = multimodal.bidirectional_visible_until(tokens, positions)
    query = QueryInfo(positions=positions, visible_until=visible, valid=tokens != 0)
    mask = np.asarray(attention_mask(query, KVContext(None, None, positions, tokens != 0),
                                     AttentionType.GLOBAL, None))[0]
    soft = list(range(4, 4 + SOFT))                 # 2, 10, \n\n, SOI, then the placeholders
    for q in range(tokens.shape[1]):
        expected = [k <= (soft[-1] if q in soft else q) for k in range(tokens.shape[1])]
        assert mask[q].tolist() == expected


def test_multimodal_forward_shapes_and_locality(mm):
    cfg, model, params = mm
    forward = jax.jit(lambda p, t, im: model.apply({'params': p}, t, images=im).logits)
    # One image per sequence, right padding in the second sequence.
    tokens = np.array([[2, 10, SOI, 11, 12, 13], [2, 20, 21, SOI, 22, 0]])
    imgs = images(0, (2, 1, 40, 60, 3))
    logits = np.asarray(forward(params, tokens, imgs))
    assert logits.shape == (2, 6, cfg.num_embed)           # the text length
    changed = imgs.copy()
    changed[0] = images(1, (1, 40, 60, 3))
    other = np.asarray(forward(params, tokens, changed))
    diff = np.abs(other - logits).max(-1)
    # The marker's row (2) is the prediction before the image; every later one sees the image.
    assert (diff[0, :3] == 0).all() and (diff[0, 3:] > 1e-3).all()
    assert (diff[1] == 0).all()                                       # other sequence untouched


@pytest.mark.parametrize('image_shape', [(IMAGE_SIZE, IMAGE_SIZE), (40, 60)],
                         ids=['native_size', 'resized'])
def test_logits_are_the_reference_rows_of_the_expanded_sequence(mm_apply, image_shape):
    # Why this rule: model.apply must return what the reference returns (its `remove_mm_logits`)
    # so that code ported from it (losses, scoring) gives the same numbers; at a marker that is
    # the "\n\n" row in front of the image, not the row after the image (which differs by the full
    # logit scale). Outside the placeholder runs the expanded sequence is causal, so row
    # `reference_rows(tokens)[i]` is the last output of the text that ends there: tokens[:i + 1]
    # for a text token, tokens[:i] + ["\n\n"] for a marker, with the images of the markers in it.
    # Each such prefix runs on its own (right-padded, return_last_only) and must equal row i of
    # one full forward. Same float32 weights and code, other shapes: <= 1.3e-5 apart (measured);
    # the block's last row instead differs by ~2.5 at the markers.
    tokens = np.array([[2, 10, 11, SOI, SOI, 12, 13, 14],        # two images in a row
                       [2, SOI, 20, SOI, 21, 22, 0, 0]])          # right padding
    imgs = images(5, (2, 2, *image_shape, 3))
    full = mm_apply(tokens, imgs, False)
    padded_length = tokens.shape[1] + 1                  # a marker's prefix gains its "\n\n"

    # Images in the prefix -> [(b, i, prefix)]; i None: the whole sequence (for return_last_only).
    prefixes: dict[int, list] = {2: [(b, None, list(row)) for b, row in enumerate(tokens)]}
    for b, row in enumerate(tokens):
        for i in np.flatnonzero(row):
            prefix = list(row[:i + 1]) if row[i] != SOI else list(row[:i]) + [sid.DOUBLE_NEWLINE]
            prefixes.setdefault(prefix.count(SOI), []).append((b, i, prefix))
    expected = np.full_like(full, np.nan)
    last_only = np.full_like(full[:, 0], np.nan)
    for count, group in prefixes.items():
        batch = np.array([p + [0] * (padded_length - len(p)) for _, _, p in group])
        group_images = None if count == 0 else imgs[[b for b, _, _ in group], :count]
        for (b, i, _), logits in zip(group, mm_apply(batch, group_images, True)):
            if i is None:
                last_only[b] = logits
            else:
                expected[b, i] = logits
    valid = tokens != 0
    np.testing.assert_allclose(full[valid], expected[valid], atol=1e-4, rtol=0)
    # return_last_only is the row of each sequence's last token (both end with text here).
    np.testing.assert_allclose(last_only, full[np.arange(2), valid.sum(-1) - 1], atol=1e-4, rtol=0)


def test_two_images_per_prompt_change_only_after_their_block(mm):
    cfg, model, params = mm
    forward = jax.jit(lambda p, t, im: model.apply({'params': p}, t, images=im).logits)
    tokens = np.array([[2, SOI, 11, 12, SOI, 13, 14], [2, 30, SOI, SOI, 31, 0, 0]])
    imgs = images(2, (2, 2, 56, 56, 3))
    logits = np.asarray(forward(params, tokens, imgs))
    assert logits.shape == (2, 7, cfg.num_embed)
    second = imgs.copy()
    second[0, 1] = images(3, (56, 56, 3))
    diff = np.abs(np.asarray(forward(params, tokens, second)) - logits).max(-1)
    assert (diff[0, :5] == 0).all() and (diff[0, 5:] > 1e-3).all()


def test_generation_with_images_equals_teacher_forcing(mm, mm_apply):
    cfg, model, params = mm
    sampler = Sampler(model=model, params=params, cache_length=96)
    # The second prompt ends with its image. Its first token must follow the image: the last row
    # of the expanded sequence (what return_last_only gives), not the marker's row of the full
    # forward, which is the prediction before the image (the reference's rule).
    prompts = [[2, 10, SOI, 11], [2, 12, 13, SOI]]
    imgs = images(4, (2, 1, 64, 64, 3))
    out = sampler.sample_tokens(prompts, 10, images=imgs, return_logits=True)
    for b, prompt in enumerate(prompts):
        full = np.array([prompt + out.tokens[b].tolist()])
        teacher = mm_apply(full, imgs[b:b + 1], False)
        after_prompt = mm_apply(np.array([prompt]), imgs[b:b + 1], True)
        np.testing.assert_allclose(out.logits[b, 0], after_prompt[0], atol=1e-4)
        np.testing.assert_allclose(out.logits[b, 1:], teacher[0, len(prompt):-1], atol=1e-4)
        gap = np.abs(teacher[0, len(prompt) - 1] - after_prompt[0]).max()
        assert gap < 1e-4 if prompt[-1] != SOI else gap > 1e-2


@pytest.mark.parametrize('tokens, imgs, message', [
    ([[2, SOI, 5]], images(0, (1, 2, 32, 32, 3)), 'marker counts'),      # more images than markers
    ([[2, SOI, SOI]], images(0, (1, 1, 32, 32, 3)), 'marker counts'),
    ([[2, SOI, 5]], images(0, (32, 32, 3)), 'shape'),
    ([[2, SOI, 5]], np.zeros((1, 32, 32, 3), np.int32), 'uint8'),
    ([[2, SOI, 5]], images(0, (1, 32, 32, 4)), 'channels'),
    ([[2, SOI, 5]], images(0, (2, 32, 32, 3)), 'batch'),
])
def test_bad_images_raise(mm, tokens, imgs, message):
    _, model, params = mm
    with pytest.raises(ValueError, match=message):
        model.apply({'params': params}, np.array(tokens), images=imgs)


def test_images_for_text_only_model_raise(mm):
    cfg, _, params = mm
    text_model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    with pytest.raises(ValueError, match='does not have vision encoder'):
        text_model.apply({'params': params}, np.array([[2, SOI]]),
                         images=images(0, (1, 32, 32, 3)))
    sampler = Sampler(model=text_model, params=params, cache_length=32)
    with pytest.raises(ValueError, match='does not have vision encoder'):
        sampler.sample_tokens([[2, SOI]], 3, images=images(0, (1, 32, 32, 3)))


def test_text_sampling_with_image_files(tmp_path):
    tokenizer = Tokenizer(default_tokenizer_path())
    cfg = dataclasses.replace(small_configs()[0], vision_encoder=small_vision(),
                              num_embed=tokenizer.vocab_size)
    model = Gemma3nTransformer(config=cfg, dtype=jnp.float32)
    params = jax.jit(model.init)(jax.random.key(1), jnp.ones((1, 4), jnp.int32))['params']
    picture = images(7, (50, 70, 3))
    Image.fromarray(picture).save(tmp_path / 'a.png')
    sampler = Sampler(model=model, params=params, tokenizer=tokenizer, cache_length=64)
    text = sampler.sample('Describe.', images=[tmp_path / 'a.png'], max_new_tokens=6)
    # The same request by hand: a marker in front, the image array resized to the encoder's size.
    ids = tokenizer.encode(st.START_OF_IMAGE_PIECE + 'Describe.', add_bos=True)
    assert ids.count(SOI) == 1
    resized = load_images([picture], IMAGE_SIZE, IMAGE_SIZE)[None]
    by_hand = sampler.sample_tokens([ids], 6, images=resized)
    assert text == tokenizer.decode(sampler.strip_stop(by_hand.tokens[0, :by_hand.lengths[0]]))
    with pytest.raises(ValueError, match='image lists'):
        sampler.sample(['a', 'b'], images=[[picture]])
