"""Traced programs kept on disk (`gemma3n.exported_programs`): a warm engine does not trace the
model, computes the same tokens, and never reuses a program made for something else."""

import logging
import platform
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n import Gemma3nTransformer, Sampler, exported_programs, freed_memory
from gemma3n.engine.sampling import RandomSampling
from gemma3n.exported_programs import FILE_SUFFIX, keep_exported_programs
from hf_oracle import random_params, small_configs

PROMPTS = [[2, 17, 33, 250, 7], [2, 91, 5]]
NEW_TOKENS = 6


@pytest.fixture
def folder(tmp_path):
    keep_exported_programs(tmp_path)
    yield tmp_path
    keep_exported_programs(None)


@pytest.fixture(scope='module')
def setup():
    cfg = small_configs()[0]                      # sliding window 8, 10 layers, 5 KV-shared
    model = Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32)
    return model, random_params(cfg, seed=0)


def sample(model, params, **kwargs):
    sampler = Sampler(model=model, params=params, cache_length=32, **kwargs)
    out = sampler.sample_tokens(PROMPTS, NEW_TOKENS, return_logits=True)
    return sampler, np.asarray(out.tokens), np.asarray(out.logits)


def stored(folder):
    return sorted(path.name.split('-')[0] for path in folder.glob(f'*{FILE_SUFFIX}'))


def test_a_warm_engine_runs_the_stored_programs_without_tracing(setup, folder, monkeypatch):
    model, params = setup
    keep_exported_programs(None)
    _, plain_tokens, plain_logits = sample(model, params)
    keep_exported_programs(folder)
    cold, tokens, logits = sample(model, params)
    assert stored(folder) == ['prefill', 'step']
    assert cold.num_traces == {'prefill': 1, 'step': 1}
    # The same program as jit's: same numbers (float32; the one program, bit for bit).
    np.testing.assert_array_equal(tokens, plain_tokens)
    np.testing.assert_array_equal(logits, plain_logits)

    def refuse(*args, **kwargs):
        raise AssertionError('the model was traced')
    monkeypatch.setattr(Gemma3nTransformer, '__call__', refuse)
    warm, warm_tokens, warm_logits = sample(model, params)
    assert warm.num_traces == {'prefill': 1, 'step': 1}    # read from disk, not traced
    np.testing.assert_array_equal(warm_tokens, plain_tokens)
    np.testing.assert_array_equal(warm_logits, plain_logits)


def test_another_model_or_sampling_gets_its_own_programs(setup, folder):
    model, params = setup
    sample(model, params)
    assert stored(folder) == ['prefill', 'step']
    sample(model, params, forbidden_tokens=[3])                  # other context
    assert stored(folder) == ['prefill'] * 2 + ['step'] * 2
    bf16 = Gemma3nTransformer(config=model.config, text_only=True, dtype=jnp.bfloat16)
    sample(bf16, params)                                        # other model
    assert stored(folder) == ['prefill'] * 3 + ['step'] * 3
    sampler = Sampler(model=model, params=params, cache_length=32)
    sampler.sample_tokens(PROMPTS, NEW_TOKENS, rng=1, sampling=RandomSampling(0.5))   # other sampling
    assert len(stored(folder)) == 8


def test_changing_the_kernels_choice_makes_new_programs(setup, folder, monkeypatch):
    model, params = setup
    sample(model, params)
    monkeypatch.setenv('GEMMA3N_KERNELS', 'off')
    sample(model, params)
    assert stored(folder) == ['prefill'] * 2 + ['step'] * 2


def test_a_damaged_program_is_replaced_with_a_warning(setup, folder, caplog):
    model, params = setup
    _, tokens, _ = sample(model, params)
    for path in folder.glob(f'*{FILE_SUFFIX}'):
        path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger=exported_programs.__name__):
        _, again, _ = sample(model, params)
    assert len([r for r in caplog.records if 'damaged traced program' in r.message]) == 2
    np.testing.assert_array_equal(again, tokens)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=exported_programs.__name__):
        sample(model, params)                                    # rewritten whole
    assert not caplog.records


def test_a_folder_that_cannot_be_written_keeps_programs_in_memory(setup, tmp_path, caplog):
    model, params = setup
    blocker = tmp_path / 'a file'
    blocker.write_text('')
    keep_exported_programs(blocker / 'exported')
    try:
        with caplog.at_level(logging.WARNING, logger=exported_programs.__name__):
            _, tokens, _ = sample(model, params)
    finally:
        keep_exported_programs(None)
    assert len([r for r in caplog.records if 'cannot keep' in r.message]) == 1    # once
    _, plain, _ = sample(model, params)
    np.testing.assert_array_equal(tokens, plain)


def test_a_source_change_makes_new_programs(setup, folder, monkeypatch):
    model, params = setup
    sample(model, params)
    monkeypatch.setattr(exported_programs, 'source_digest', lambda: 'another source')
    sample(model, params)
    assert stored(folder) == ['prefill'] * 2 + ['step'] * 2


@pytest.mark.parametrize('kept', [False, True])
def test_a_leaf_reused_or_replaced_keeps_its_own_program(tmp_path, kept):
    # Signatures are reused for the very JAX arrays of the previous call (the weights of every
    # step); a new array in the same place, or a NumPy array reshaped in place, is looked at
    # anew. The donated argument is consumed each call, as the cache is.
    keep_exported_programs(tmp_path if kept else None)
    try:
        fn = exported_programs.ExportedJit(lambda w, x: (w * x).sum(axis=-1), name='probe',
                                           context='', donate_argnames=('x',))
        w = jnp.arange(6.0).reshape(2, 3)
        np.testing.assert_array_equal(fn(w, jnp.ones((2, 3))), [3.0, 12.0])
        np.testing.assert_array_equal(fn(w, jnp.full((2, 3), 2.0, jnp.float32)), [6.0, 24.0])
        assert fn.programs == 1
        wider = jnp.arange(8.0).reshape(2, 4)
        np.testing.assert_array_equal(fn(wider, jnp.ones((2, 4))), [6.0, 22.0])
        assert fn.programs == 2
        host = np.arange(6.0, dtype=np.float32).reshape(2, 3)
        np.testing.assert_array_equal(fn(host, jnp.ones((2, 3))), [3.0, 12.0])
        host.shape = (3, 2)
        np.testing.assert_array_equal(fn(host, jnp.ones((3, 2))), [1.0, 5.0, 9.0])
        assert fn.programs == 3          # the (2, 3) host array took w's program
        assert stored(tmp_path) == (['probe'] * 3 if kept else [])
    finally:
        keep_exported_programs(None)


def test_each_new_program_gives_the_heap_freed_by_compiling_back(monkeypatch):
    # Compiling an E4B program left ~0.3 GB freed but resident in glibc's arenas
    # (`gemma3n.freed_memory`): trimmed once per new program, not on every call.
    trims = []
    monkeypatch.setattr(exported_programs, 'return_freed_memory', lambda: trims.append(1))
    fn = exported_programs.ExportedJit(lambda x: x * 2.0, name='probe', context='')
    for shape in ((2,), (2,), (3,), (2,)):
        fn(jnp.ones(shape))
    assert fn.programs == 2 and len(trims) == 2
    if sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc':
        assert freed_memory._malloc_trim() is not None
    freed_memory.return_freed_memory()           # a no-op where the C library has no trim
