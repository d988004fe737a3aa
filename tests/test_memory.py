"""Memory checked before it is asked for: the estimates, the refusal, the command's messages."""

import jax
import jax.numpy as jnp
import pytest

from gemma3n import Gemma3nTransformer, Sampler, cli, memory
from gemma3n.cache import cache_nbytes, init_cache
from gemma3n.cli import model as cli_model
from gemma3n.models import e4b_config
from gemma3n.engine.prefill import MIN_PREFILL_BUCKET
from hf_oracle import random_params, small_configs

PROMPTS = [[2, 17, 33], [2, 91]]
E4B_LONG = 32768
E4B_CHUNK = 512


@pytest.mark.parametrize('config', [small_configs()[0], e4b_config(with_vision=False)],
                         ids=['small', 'e4b'])
@pytest.mark.parametrize('batch, length', [(1, 5), (3, 100), (2, E4B_LONG)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_cache_bytes_equal_the_allocated_cache(config, batch, length, dtype):
    shapes = jax.eval_shape(lambda: init_cache(config, batch, dtype, length))
    assert memory.cache_bytes(config, batch, dtype, length) == cache_nbytes(shapes)


def test_cache_bytes_of_huge_lengths_do_not_overflow():
    cfg = e4b_config(with_vision=False)
    small = memory.cache_bytes(cfg, 1, jnp.bfloat16, E4B_LONG)
    per_position = (memory.cache_bytes(cfg, 1, jnp.bfloat16, 2 * E4B_LONG) - small) // E4B_LONG
    huge = 10 ** 20
    expected = small + (huge - E4B_LONG) * per_position
    assert memory.cache_bytes(cfg, 1, jnp.bfloat16, huge) == expected


def test_chunk_estimate_grows_with_the_chunk_not_beyond():
    cfg = e4b_config(with_vision=False)
    one = memory.prefill_chunk_bytes(cfg, 1, E4B_CHUNK, E4B_LONG, jnp.bfloat16)
    # At least one global layer's float32 attention scores of the chunk against the cache.
    assert one > cfg.num_heads * E4B_CHUNK * E4B_LONG * 4
    assert memory.prefill_chunk_bytes(cfg, 1, 2 * E4B_CHUNK, E4B_LONG, jnp.bfloat16) < 2.1 * one
    assert memory.prefill_chunk_bytes(cfg, 2, E4B_CHUNK, E4B_LONG, jnp.bfloat16) == 2 * one


@pytest.fixture(scope='module')
def small():
    cfg = small_configs()[0]
    return Gemma3nTransformer(config=cfg, text_only=True, dtype=jnp.float32), random_params(cfg, 0)


def need_of(model, batch, cache_length, new_cache=True):
    cfg = model.config
    need = memory.prefill_chunk_bytes(cfg, batch, MIN_PREFILL_BUCKET, cache_length, jnp.float32)
    if new_cache:
        need += memory.cache_bytes(cfg, batch, jnp.float32, cache_length)
    return need


def test_refused_exactly_when_the_need_exceeds_what_is_available(small, monkeypatch):
    model, params = small
    sampler = Sampler(model=model, params=params, cache_length=64)
    need = need_of(model, 2, 64)
    monkeypatch.setattr(memory, 'available_bytes', lambda device=None: need - 1)
    with pytest.raises(memory.InsufficientMemoryError) as info:
        sampler.sample_tokens(PROMPTS, 2)
    error = info.value
    assert (error.need, error.available) == (need, need - 1)
    assert error.options == ('cache_length', 'prefill_chunk', 'the number of prompts')
    assert str(error).startswith('a KV cache of 64 positions for 2 sequences')
    assert memory.format_bytes(need) in str(error)
    assert sampler.num_traces == {'prefill': 0, 'step': 0}          # before any work
    monkeypatch.setattr(memory, 'available_bytes', lambda device=None: need)
    out = sampler.sample_tokens(PROMPTS, 2)
    # Continuing needs no new cache: only the chunk is checked.
    monkeypatch.setattr(memory, 'available_bytes',
                        lambda device=None: need_of(model, 2, 64, new_cache=False) - 1)
    with pytest.raises(memory.InsufficientMemoryError, match='^prefilling 2 sequences 16 tokens'):
        sampler.sample_tokens(PROMPTS, 2, state=out.state)


def test_a_cache_larger_than_this_machine_is_refused(small):
    model, params = small
    # The longest cache_length the sampler accepts (int32 positions): ~1 TB for this model.
    sampler = Sampler(model=model, params=params, cache_length=2 ** 31 - 1)
    with pytest.raises(memory.InsufficientMemoryError, match='cache_length or prefill_chunk'):
        sampler.sample_tokens(PROMPTS[:1], 2)
    assert sampler.num_traces == {'prefill': 0, 'step': 0}


@pytest.mark.parametrize('limit, expected', [('max', 1000 * 1024), ('800000', 400000)])
def test_host_memory_is_bounded_by_the_container(limit, expected, tmp_path, monkeypatch):
    files = {'MEMINFO': 'MemTotal: 4000 kB\nMemAvailable: 1000 kB\n', 'CGROUP_LIMIT': limit,
             'CGROUP_USAGE': '500000', 'CGROUP_STAT': 'active_file 7\ninactive_file 100000\n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        monkeypatch.setattr(memory, name, tmp_path / name)
    # The container's limit less its usage, the reclaimable page cache given back.
    assert memory.host_available_bytes() == expected
    assert memory.available_bytes(jax.devices('cpu')[0]) == expected


# ---- the command line ---------------------------------------------------------------------

@pytest.mark.parametrize('error', [
    jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 52000000000 bytes.'),
    MemoryError(),
])
def test_the_command_reports_out_of_memory_in_one_line(error, monkeypatch, capsys):
    def load_model(*args, **kwargs):
        raise error
    monkeypatch.setattr(cli_model, 'load_model', load_model)
    monkeypatch.setattr(cli, '_use_compilation_cache', lambda: None)
    assert cli.main(['generate', 'Hi']) == cli.USAGE_ERROR
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('gemma3n: error: out of memory')
    assert '--cache-length' in lines[0]


def test_the_command_lets_other_runtime_errors_through(monkeypatch):
    def load_model(*args, **kwargs):
        raise jax.errors.JaxRuntimeError('INTERNAL: a bug')
    monkeypatch.setattr(cli_model, 'load_model', load_model)
    monkeypatch.setattr(cli, '_use_compilation_cache', lambda: None)
    with pytest.raises(jax.errors.JaxRuntimeError, match='a bug'):
        cli.main(['generate', 'Hi'])
