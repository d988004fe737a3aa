"""Chunked prefill against one-shot prefill (text, ragged batches, images); how prompts are cut."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n import Gemma3nTransformer, Sampler
from gemma3n.layers import special_ids as sid
from gemma3n.text import special_tokens as st
from gemma3n.engine.prefill import MIN_PREFILL_BUCKET, chunk_width, cut_points, plan_chunks
from gemma3n.vision import SigLiPFromPatches, ViTModel, VisionExit
from hf_oracle import random_params, small_configs

# Chunked and one-shot prefill add the same terms in a different order and grouping (a sliding
# layer's queries see the ring as it was plus their chunk's keys, not the whole prompt's; matmuls
# of other shapes), so float32 rounding differs, and 10-15 layers amplify it: measured up to
# 2e-5 on logits of magnitude 1-5, i.e. 5e-6 of the largest. That is float32's floor for these
# configs, not an error of the method: the one-shot prefill alone, of the same prompt in a batch
# of 3 instead of 1, differs by 8e-6 (a wrong mask or position shows as 1e-2 or more). So the
# bound is 1e-5 relative to the largest value compared (the logits, or one cache buffer), and
# 2e-5 where an image's encoder output is prefilled too: the tests compile at XLA's optimisation
# level 0 (conftest.py), which rounds float32 differently; with images measured 1.3e-5 there
# (3.1-4.0e-6 at the default level).
CHUNK_TOL = 1e-5
CHUNK_TOL_IMAGES = 2e-5
WINDOW = 8                                   # small_configs' sliding window
NEW_TOKENS = 6                               # decode steps after the prefill, reading its cache
ONE_SHOT = 128                               # a chunk longer than every prompt here
SOI = sid.START_OF_IMAGE
SOFT = 4                                     # soft tokens per image of the small encoder


def ragged_prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[st.BOS] + rng.integers(3, vocab, n - 1).tolist() for n in lengths]


def assert_close(ours, reference, tol=CHUNK_TOL):
    reference = np.asarray(reference)
    np.testing.assert_allclose(np.asarray(ours), reference,
                               atol=tol * np.abs(reference).max(), rtol=0)


def assert_same_generation(ours, reference, tol=CHUNK_TOL):
    """Same first token and logits, same cache after the prompt, same next steps."""
    assert_close(ours.logits, reference.logits, tol)
    assert (ours.tokens == reference.tokens).all()
    for mine, theirs in zip(jax.tree_util.tree_leaves(ours.state.cache),
                            jax.tree_util.tree_leaves(reference.state.cache)):
        assert_close(mine, theirs, tol)
    diff = np.abs(ours.logits - reference.logits)
    return float(diff.max()), float(diff.max() / np.abs(reference.logits).max())


@functools.lru_cache
def text_setup(index):
    """A small config's model, params, ragged prompts and their one-shot generation."""
    cfg = small_configs()[index]
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    params = random_params(cfg, seed=index)
    prompts = ragged_prompts(cfg.num_embed, [61, 29, 5])      # up to 7 windows, 3 sequences
    reference = Sampler(model=model, params=params, cache_length=96, prefill_chunk=ONE_SHOT
                        ).sample_tokens(prompts, NEW_TOKENS, return_logits=True)
    return model, params, prompts, reference


# Chunks shorter than, equal to, not a multiple of, and twice the sliding window; config 2 has
# 10 KV-shared layers of 15.
@pytest.mark.parametrize('index, chunk', [(0, 3), (0, WINDOW), (0, 13), (0, 2 * WINDOW),
                                          (2, 3), (2, 2 * WINDOW)])
def test_chunked_prefill_equals_one_shot(index, chunk):
    model, params, prompts, reference = text_setup(index)
    sampler = Sampler(model=model, params=params, cache_length=96, prefill_chunk=chunk)
    out = sampler.sample_tokens(prompts, NEW_TOKENS, return_logits=True)
    diff, relative = assert_same_generation(out, reference)
    print(f'\n{model.config.num_layers} layers, chunk {chunk}: max |logit diff| {diff:.2e} '
          f'({relative:.1e} of the largest logit)')
    # Every chunk, the last of each prompt included, has the width `chunk` (all <= 16).
    assert sampler.num_traces['prefill'] == 1


def test_continuing_a_state_in_chunks_equals_one_shot():
    model, params, prompts, _ = text_setup(0)
    follow = ragged_prompts(model.config.num_embed, [4, 23, 40], seed=1)
    outs = []
    for chunk in (5, ONE_SHOT):
        sampler = Sampler(model=model, params=params, cache_length=128, prefill_chunk=chunk)
        first = sampler.sample_tokens(prompts, 3)
        outs.append(sampler.sample_tokens(follow, NEW_TOKENS, state=first.state,
                                          return_logits=True))
    assert_same_generation(*outs)


def test_compiled_programs_depend_on_the_chunk_not_the_prompt():
    cfg = small_configs()[0]
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    sampler = Sampler(model=model, params=random_params(cfg, seed=0), cache_length=256,
                      prefill_chunk=32)
    for length in (100, 70, 90, 150, 201):
        sampler.sample_tokens(ragged_prompts(cfg.num_embed, [length]), 1)
    # Full chunks are 32 wide, last chunks 16 or 32 (powers of two): two programs.
    assert sampler.num_traces['prefill'] == 2


@pytest.mark.parametrize('chunk, error, message', [
    (0, ValueError, 'prefill_chunk must be in'), (-5, ValueError, 'prefill_chunk must be in'),
    (2.5, TypeError, 'prefill_chunk must be an integer'),
    (True, TypeError, 'prefill_chunk must be an integer')])
def test_bad_chunk_lengths_are_refused(chunk, error, message):
    cfg = small_configs()[0]
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    with pytest.raises(error, match=message):
        Sampler(model=model, params={}, prefill_chunk=chunk)


def test_chunk_widths():
    assert chunk_width(1, 512) == MIN_PREFILL_BUCKET
    assert chunk_width(300, 512) == 512 and chunk_width(200, 512) == 256
    assert chunk_width(512, 512) == 512 and chunk_width(20, 13) == 13


def test_plan_cuts_each_sequence_on_its_own():
    rows = [np.arange(2, 42), np.arange(2, 12), np.arange(2, 3)]
    chunks = plan_chunks(rows, 16)
    assert len(chunks) == 3
    assert [c.starts.tolist() for c in chunks] == [[0, 0, 0], [16, 10, 1], [32, 10, 1]]
    assert [c.holds_last.tolist() for c in chunks] == [[False, True, True], [False, False, False],
                                                       [True, False, False]]
    assert chunks[0].tokens[1].tolist() == rows[1].tolist() + [0] * 6
    assert chunks[2].tokens.shape == (3, 16)
    assert chunks[2].tokens[0, :8].tolist() == list(range(34, 42))
    again = np.concatenate([c.tokens[0, :e - s] for c, s, e in zip(
        chunks, [0, 16, 32], [16, 32, 40])])
    assert again.tolist() == rows[0].tolist()


def test_cuts_keep_image_runs_whole():
    row = np.array([2, 5, 6, sid.DOUBLE_NEWLINE, SOI] + [sid.IMAGE_PLACEHOLDER] * SOFT
                   + [sid.END_OF_IMAGE, 7, 8, 9, 10, 11])
    # A cut at 6 or at 8 would split the run [5, 9): it moves back to 5.
    assert cut_points(row, 6) == [5, 11, 15]
    assert cut_points(row, 8) == [5, 13, 15]
    assert cut_points(row, 10) == [10, 15]            # the run ends at 9: no split
    assert cut_points(row, SOFT) == [4, 5, 9, 13, 15]   # a run fits a chunk of its length
    with pytest.raises(ValueError, match='too short'):
        cut_points(row, SOFT - 1)


# ---- images -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def mm():
    vision = SigLiPFromPatches(
        siglip_encoder=ViTModel(width=32, depth=2, mlp_dim=64, num_heads=4),
        siglip_exit=VisionExit(output_length=SOFT),
        num_mm_tokens_per_image_prepool=64, num_mm_tokens_per_image=SOFT,
        image_height=112, image_width=112)
    cfg = dataclasses.replace(small_configs()[0], vision_encoder=vision)
    model = Gemma3nTransformer(config=cfg, dtype=jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))['params']
    return model, params


def test_chunked_prefill_with_images_equals_one_shot(mm):
    model, params = mm
    rng = np.random.default_rng(3)
    # Ragged, two images each at different places; runs fall across the 6- and 7-token grid.
    prompts = [[2, 10, SOI, 11, 12, 13, 14, SOI] + list(range(20, 40)),
               [2, SOI, 12, 13, 14, 15, 16, 17, 18, SOI, 19]]
    images = rng.integers(0, 256, (2, 2, 48, 48, 3), dtype=np.uint8)
    reference = Sampler(model=model, params=params, cache_length=96, prefill_chunk=ONE_SHOT
                        ).sample_tokens(prompts, NEW_TOKENS, images=images, return_logits=True)
    for chunk in (SOFT + 2, SOFT + 3):
        out = Sampler(model=model, params=params, cache_length=96, prefill_chunk=chunk
                      ).sample_tokens(prompts, NEW_TOKENS, images=images, return_logits=True)
        diff, relative = assert_same_generation(out, reference, CHUNK_TOL_IMAGES)
        print(f'\nimages, chunk {chunk}: max |logit diff| {diff:.2e} ({relative:.1e} of the '
              'largest logit)')


def test_chunk_too_short_for_an_image_is_refused_before_work(mm):
    model, params = mm
    sampler = Sampler(model=model, params=params, cache_length=64, prefill_chunk=SOFT - 1)
    images = np.zeros((1, 1, 48, 48, 3), np.uint8)
    with pytest.raises(ValueError, match='prefill_chunk 3 cannot hold'):
        sampler.sample_tokens([[2, SOI, 5]], 2, images=images)
    assert sampler.num_traces == {'prefill': 0, 'step': 0}
