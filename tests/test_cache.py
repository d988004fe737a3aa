"""The compact KV cache: its size, and decoding through it against the full forward pass and HF."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma3n import Gemma3n_E4B, Gemma3nTransformer, Sampler
from gemma3n.cache import END_INDEX, cache_nbytes, cache_slots, init_cache
from gemma3n.engine.engine import Engine
from gemma3n.engine.sampling import Greedy
from hf_oracle import make_hf_causal_lm, random_params, small_configs

MIB = 2 ** 20
# Same bound and reason as the decoder parity tests (tests/test_model.py): float32 rounding
# amplified through the layers' norms stays near 5e-5 on logits of magnitude 1-10.
F32_LOGIT_TOL = 1e-4


def e4b_cache_bytes(length):
    cfg = Gemma3n_E4B().config
    return cache_nbytes(jax.eval_shape(lambda: init_cache(cfg, 1, jnp.bfloat16, length)))


def test_e4b_cache_size():
    cfg = Gemma3n_E4B().config
    slots = cache_slots(cfg, 32768)
    assert sorted(slots) == list(range(20))                      # only K/V-owning layers
    assert [i for i, s in slots.items() if s == 32768] == [4, 9, 14, 19]
    assert all(s == 512 for i, s in slots.items() if i not in (4, 9, 14, 19))
    size_32k = e4b_cache_bytes(32768)
    assert size_32k <= 300 * MIB
    # 4 global layers x 2 (K, V) x 2 heads x 256 x 2 bytes per position, + 16 rings of 512.
    per_position = 4 * 2 * 2 * 256 * 2
    ring_bytes = 16 * 512 * 2 * 2 * 256 * 2
    assert e4b_cache_bytes(4096) == 4096 * per_position + ring_bytes + 4   # + end_index
    assert size_32k - e4b_cache_bytes(16384) == 16384 * per_position


@pytest.fixture(scope='module')
def setup():
    cfg = small_configs()[0]                      # sliding window 8, 10 layers, 5 KV-shared
    params = random_params(cfg, seed=0)
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    forward = jax.jit(lambda p, t: model.apply({'params': p}, t).logits)
    return cfg, params, model, forward


PROMPTS = [[2, 17, 33, 250, 7], [2, 91, 5]]        # ragged: padded inside the sampler


def test_greedy_through_cache_equals_full_forward(setup):
    cfg, params, model, forward = setup
    sampler = Sampler(model=model, params=params, cache_length=64)
    new = 30                                         # prompt + 30 > 2 x window: rings wrap
    out = sampler.sample_tokens(PROMPTS, new, return_logits=True)
    assert out.tokens.shape == (2, new) and out.logits.shape == (2, new, cfg.num_embed)
    for b, prompt in enumerate(PROMPTS):
        full = np.array([prompt + out.tokens[b].tolist()])
        teacher = np.asarray(forward(params, full))[0, len(prompt) - 1:-1]
        np.testing.assert_allclose(out.logits[b], teacher, atol=F32_LOGIT_TOL, rtol=0)
        assert (teacher.argmax(-1) == out.tokens[b]).all()
    assert sampler.num_traces == {'prefill': 1, 'step': 1}


def test_decode_matches_transformers_generate(setup):
    cfg, params, model, _ = setup
    hf = make_hf_causal_lm(cfg, params)
    sampler = Sampler(model=model, params=params, cache_length=64)
    prompt = PROMPTS[0]
    out = sampler.sample_tokens([prompt], 24, return_logits=True)
    with torch.no_grad():
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, min_new_tokens=24)
    theirs = torch.stack(gen.logits, dim=1).numpy()[0]
    assert gen.sequences[0, len(prompt):].tolist() == out.tokens[0].tolist()
    np.testing.assert_allclose(out.logits[0], theirs, atol=F32_LOGIT_TOL, rtol=0)


def test_continuing_a_state_equals_one_call(setup):
    cfg, params, model, _ = setup
    sampler = Sampler(model=model, params=params, cache_length=64)
    first = sampler.sample_tokens(PROMPTS, 6)
    follow = [[40, 41], [42]]
    second = sampler.sample_tokens(follow, 8, state=first.state)
    for b, prompt in enumerate(PROMPTS):
        whole = prompt + first.tokens[b].tolist() + follow[b]
        once = sampler.sample_tokens([whole], 8)
        assert once.tokens[0].tolist() == second.tokens[b].tolist()
    assert sampler.num_traces['step'] == 2                  # batch 2 and batch 1


def test_stop_token_ends_one_sequence_only(setup):
    cfg, params, model, _ = setup
    free = Sampler(model=model, params=params, cache_length=64).sample_tokens(PROMPTS, 12)
    stop = int(free.tokens[0, 3])
    assert stop not in free.tokens[0, :3].tolist()
    sampler = Sampler(model=model, params=params, cache_length=64, stop_tokens=(stop,))
    out = sampler.sample_tokens(PROMPTS, 12)
    assert out.lengths[0] == 4 and out.tokens[0, 3] == stop
    assert (out.tokens[0, 4:] == 0).all()
    if stop not in free.tokens[1].tolist():
        assert out.lengths[1] == 12 and out.tokens[1].tolist() == free.tokens[1].tolist()


@pytest.mark.parametrize('prompt, new, message', [
    ([[2] * 60], 10, 'cache_length'),
    ([[]], 4, 'empty'),
    ([[2, 5000]], 4, 'outside the vocabulary'),
    ([[2, -7]], 4, 'outside the vocabulary'),
    ([[2.5, 3.0]], 4, 'integer'),
    ([[2, 3]], 0, 'max_new_tokens'),
])
def test_bad_input_raises_before_compiling(setup, prompt, new, message):
    _, params, model, _ = setup
    sampler = Sampler(model=model, params=params, cache_length=64)
    # Float ids are a TypeError, the rest ValueErrors; `match` tells them apart.
    with pytest.raises((TypeError, ValueError), match=message):
        sampler.sample_tokens(prompt, new)
    assert sampler.num_traces == {'prefill': 0, 'step': 0}


def test_continuation_past_cache_raises(setup):
    _, params, model, _ = setup
    sampler = Sampler(model=model, params=params, cache_length=24)
    first = sampler.sample_tokens([[2, 3, 4]], 10)
    with pytest.raises(ValueError, match='cache already holding 12'):
        sampler.sample_tokens([[5] * 5], 10, state=first.state)


def buffer_ops(text, cache):
    """The ops of compiled HLO `text` (fusions' insides included) making an array of a cache
    buffer's shape."""
    shapes = {','.join(map(str, x.shape)) for key, entry in cache.items()
              if key != END_INDEX for x in entry.values()}
    return {op for shape, op in re.findall(r'= \w+\[([\d,]+)\]\S* (\S+)\(', text)
            if shape in shapes}


def test_bf16_decode_step_writes_each_buffer_in_one_pass(setup):
    """A decode step of a bfloat16 cache writes its token by a select, not a scatter or a
    dynamic_update_slice (around which XLA's CPU backend widens the buffer to float32, writes it
    whole and copies it into the donated buffer): no copy of a buffer, full or ring."""
    cfg, params, _, _ = setup
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.bfloat16)
    engine = Engine(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    cache = engine.new_cache(2, cache_length=32)
    text = engine._step.lower(engine.params, jnp.zeros(2, jnp.int32), cache, jax.random.key(0),
                              None, Greedy()).compile().as_text()
    ops = buffer_ops(text, cache)
    assert {'parameter', 'select'} <= ops                    # the buffers are found
    assert not ops & {'copy', 'dynamic-update-slice', 'scatter'}
