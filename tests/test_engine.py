"""The generation engine's slots: sequences joining and leaving a batched KV cache between decode
steps give the tokens each gives alone through `Sampler`; per-slot sampling settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n import Gemma3nTransformer, Sampler
from gemma3n.cache import END_INDEX
from gemma3n.engine.batch import Batch
from gemma3n.engine.engine import Engine
from gemma3n.engine.sampling import Greedy, SlotSampling
from gemma3n.layers import special_ids
from gemma3n.text import special_tokens as st
from hf_oracle import random_params, small_configs

CACHE_LENGTH = 64
SLOTS = 3
KEY = jax.random.key(0)
# A slot's prefill runs the batch-1 program on a slice of the cache; a decode step runs all
# slots at once, whose float32 matmuls round differently from batch 1's by ~1e-5 relative
# (see tests/test_prefill.py): logits are compared to that bound, tokens exactly.
LOGIT_TOL = 1e-5


@pytest.fixture(scope='module')
def setup():
    cfg = small_configs()[0]                      # sliding window 8, 10 layers, 5 KV-shared
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    params = random_params(cfg, seed=0)
    sampler = Sampler(model=model, params=params, cache_length=CACHE_LENGTH)
    rng = np.random.default_rng(1)
    # Lengths around and past the window of 8, prompt + answer up to 3 windows.
    prompts = [[st.BOS] + rng.integers(3, cfg.num_embed, n - 1).tolist() for n in (5, 19, 9, 2)]
    return sampler, prompts


def alone(sampler, prompt, new_tokens):
    out = sampler.sample_tokens([prompt], new_tokens, return_logits=True)
    return out.tokens[0], out.logits[0]


def slot_caches(cache, slot):
    return [np.asarray(leaf[slot]) for leaf in jax.tree_util.tree_leaves(cache)]


def test_sequences_joining_and_leaving_give_their_tokens_alone(setup):
    """Slot 0 decodes from the start; slot 1 joins after 3 steps and leaves after 4 tokens;
    slot 2 joins after 6 steps; the freed slot 1 takes a fourth prompt (its old K/V still in the
    buffers, unread) after 9 steps. Every sequence ends past the sliding window."""
    sampler, prompts = setup
    joins = {0: (0, prompts[0], 14), 3: (1, prompts[1], 4), 6: (2, prompts[2], 10),
             9: (1, prompts[3], 12)}
    batch = Batch(sampler.engine, sampler.engine.new_cache(SLOTS, CACHE_LENGTH))
    got = {}                                       # prompt index -> tokens, logits
    running = {}                                   # slot -> (prompt index, tokens left)
    for step in range(30):
        if step in joins:
            slot, prompt, new = joins[step]
            index = prompts.index(prompt)
            token, logits = batch.admit(slot, np.array(prompt, np.int32), KEY, Greedy())
            got[index] = ([token], [np.asarray(logits)])
            running[slot] = (index, new - 1)
        if not running:
            break
        tokens, logits = batch.step(KEY, Greedy())
        assert (tokens[~batch.active] == special_ids.PAD).all()
        for slot, (index, left) in list(running.items()):
            got[index][0].append(int(tokens[slot]))
            got[index][1].append(np.asarray(logits[slot]))
            running[slot] = (index, left - 1)
            if left == 1:
                batch.free(slot)
                del running[slot]
    for index, (_, prompt, new) in enumerate(joins.values()):
        tokens, logits = alone(sampler, prompt, new)
        assert got[index][0][:new] == tokens.tolist(), index
        np.testing.assert_allclose(np.stack(got[index][1][:new]), logits,
                                   atol=LOGIT_TOL * np.abs(logits).max(), rtol=0)


def test_admitting_a_slot_leaves_the_others_untouched(setup):
    sampler, prompts = setup
    engine = sampler.engine
    batch = Batch(engine, engine.new_cache(SLOTS, CACHE_LENGTH))
    batch.admit(0, np.array(prompts[1], np.int32), KEY, Greedy())
    batch.step(KEY, Greedy())
    before = [slot_caches(batch.cache, s) for s in (0, 2)]
    batch.admit(1, np.array(prompts[0], np.int32), KEY, Greedy())
    for slot, cached in zip((0, 2), before):
        for old, new in zip(cached, slot_caches(batch.cache, slot)):
            assert np.array_equal(old, new)          # bit for bit
    lengths = np.asarray(batch.cache[END_INDEX])
    assert lengths.tolist() == [len(prompts[1]) + 1, len(prompts[0]), 0]
    # An inactive slot is fed padding: its cache does not move.
    batch.finish(0)
    kept = slot_caches(batch.cache, 0)
    batch.step(KEY, Greedy())
    assert all(np.array_equal(a, b) for a, b in zip(kept, slot_caches(batch.cache, 0)))
    with pytest.raises(ValueError, match='slot 1 holds an active sequence'):
        batch.admit(1, np.array(prompts[0], np.int32), KEY, Greedy())


def test_the_lock_step_batch_compiles_once_per_shape(setup):
    sampler, prompts = setup
    engine = Engine(sampler.model, sampler.params)
    batch = Batch(engine, engine.new_cache(2, CACHE_LENGTH))
    batch.fill([np.array(p, np.int32) for p in prompts[:2]], KEY, Greedy())
    for _ in range(3):
        batch.step(KEY, Greedy())
    assert engine.num_traces == {'prefill': 1, 'step': 1}


def test_an_occupied_only_step_computes_the_rows_covering_the_active_slots(setup):
    """Rows computed (the logits' rows): the power of two covering the last active slot, at
    most the slots; a moved sequence goes on with its own tokens; a move onto a held slot and
    a step with more tokens than the cache has rows are refused."""
    sampler, prompts = setup
    engine = sampler.engine
    batch = Batch(engine, engine.new_cache(SLOTS, CACHE_LENGTH), occupied_only=True)
    batch.admit(0, np.array(prompts[0], np.int32), KEY, Greedy())
    assert batch.step(KEY, Greedy())[1].shape[0] == 1
    first, _ = batch.admit(2, np.array(prompts[1], np.int32), KEY, Greedy())
    tokens, logits = batch.step(KEY, Greedy())
    assert logits.shape[0] == SLOTS                 # 4 rows covering slot 2, at most 3
    batch.finish(0)
    assert batch.step_rows() == SLOTS
    with pytest.raises(ValueError, match='slot 0 holds a sequence'):
        batch.move(2, 0)
    batch.free(0)
    batch.move(2, 0)
    assert batch.active.tolist() == [True, False, False] and batch.step_rows() == 1
    moved = [first, int(tokens[2])]
    for _ in range(3):
        moved.append(int(batch.step(KEY, Greedy())[0][0]))
    assert moved == alone(sampler, prompts[1], len(moved))[0].tolist()
    with pytest.raises(ValueError, match='a step takes 1 to 3 tokens'):
        engine.step(np.zeros(SLOTS + 1, np.int32), batch.cache, KEY, Greedy())


def logits_rows(batch, vocab, seed=3):
    return jax.random.normal(jax.random.key(seed), (batch, vocab))


def test_slot_sampling_greedy_rows_and_top_k_one_are_the_argmax():
    logits = logits_rows(4, 50)
    rows = SlotSampling.of([(0.0, 0, 1.0, 0), (0.7, 1, 1.0, 1), (0.0, 5, 0.5, 2),
                            (2.0, 1, 0.3, 3)], counts=[0, 0, 4, 9])
    assert np.array_equal(np.asarray(rows(logits, KEY)), np.asarray(logits.argmax(-1)))


def test_slot_sampling_draws_depend_on_the_row_only():
    """A row's token is the same whatever shares the batch: own seed, own count."""
    logits = logits_rows(3, 50)
    settings = [(0.0, 0, 1.0, 0), (1.0, 10, 0.9, 42), (1.5, 0, 1.0, 7)]
    together = np.asarray(SlotSampling.of(settings, counts=[0, 5, 2])(logits, KEY))
    for b in range(3):
        own = SlotSampling.of([settings[b]], counts=[[0, 5, 2][b]])(logits[b:b + 1], KEY)
        assert int(own[0]) == together[b]
    # Draws vary with the count (the token index), and stay among the top_k.
    draws = {int(SlotSampling.of([settings[1]], counts=[c])(logits[1:2], KEY)[0])
             for c in range(40)}
    assert len(draws) > 1
    assert draws <= set(np.argsort(-np.asarray(logits[1]))[:10].tolist())


@pytest.mark.parametrize('setting, message', [
    ((-1.0, 0, 1.0, 0), 'temperature must be > 0'),
    ((1.0, -2, 1.0, 0), 'top_k must be in'),
    ((1.0, 0, 0.0, 0), 'top_p must be in'),
    ((1.0, 0, 1.0, -5), 'seed must be in'),
])
def test_slot_sampling_refuses_bad_settings(setting, message):
    with pytest.raises(ValueError, match=message):
        SlotSampling.of([setting], counts=[0])
