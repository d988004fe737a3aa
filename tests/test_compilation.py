"""The command's compilation cache: first-run compiles announced, damaged entries repaired.

Real `gemma3n generate` runs on the demo model in subprocesses sharing one fresh cache folder;
the tests run in order (the first fills the cache).
"""

import os
import subprocess
import sys
import zlib

import pytest

from gemma3n import cli
from test_cli import run_cli

NOTICES = {f'gemma3n: {cli.COMPILING_DEMO}', f'gemma3n: {cli.COMPILING_PROMPT}'}
REPAIRED = 'gemma3n: deleted an unreadable compilation cache entry for '
ENTRY_SUFFIX = '-cache'
COMMAND = ('generate', '--max-new-tokens', '2', 'Hello')


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def env(cache):
    return dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache))


@pytest.fixture(scope='module')
def first_run(env, cache):
    """The first run of COMMAND, and the cache entries it wrote (the programs COMMAND runs)."""
    result = run_cli(env, *COMMAND)
    assert result.returncode == 0, result.stderr
    result.entries = sorted(cache.glob(f'*{ENTRY_SUFFIX}'), key=lambda p: p.stat().st_size)
    return result


def said(result):
    """The lines the command wrote to stderr after the demo's notice."""
    return result.stderr.splitlines()[len(cli.DEMO_NOTICE.splitlines()):]


def test_the_first_run_says_it_is_compiling(first_run):
    # Today: 15-30 s of silence. The weights' and the prompt's programs are announced once each.
    assert said(first_run) == [f'gemma3n: {cli.COMPILING_DEMO}', f'gemma3n: {cli.COMPILING_PROMPT}']


def test_a_run_that_compiles_nothing_says_nothing(env, first_run):
    again = run_cli(env, *COMMAND)
    assert again.returncode == 0, again.stderr
    assert said(again) == []
    assert again.stdout == first_run.stdout


def test_a_new_prompt_length_is_announced(env, first_run):
    longer = run_cli(env, 'generate', '--max-new-tokens', '2', 'Hello ' * 40)
    assert longer.returncode == 0, longer.stderr
    assert said(longer) == [f'gemma3n: {cli.COMPILING_PROMPT}']


def test_damaged_cache_entries_are_replaced_once(env, cache, first_run):
    cut, garbled = first_run.entries[-2:]
    sizes = {cut: cut.stat().st_size, garbled: garbled.stat().st_size}
    cut.write_bytes(cut.read_bytes()[:1000])                  # cut short, as by a killed run
    garbled.write_bytes(zlib.compress(b'not an executable' * 100))   # unpacks, then fails to load
    repaired = run_cli(env, *COMMAND)
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout == first_run.stdout
    # Today: JAX's raw UserWarning, and again on every later run.
    assert 'Warning' not in repaired.stderr
    lines = [line for line in said(repaired) if line not in NOTICES]
    assert sorted(line.startswith(REPAIRED) for line in lines) == [True, True], repaired.stderr
    for entry in (cut, garbled):
        assert sum(entry.name in line for line in lines) == 1
        assert entry.stat().st_size > sizes[entry] // 2      # rewritten whole
    clean = run_cli(env, *COMMAND)           # the rewritten entries load
    assert said(clean) == []
    assert clean.stdout == first_run.stdout


def test_a_cache_folder_that_cannot_be_made_is_reported_in_one_line(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(blocker / 'jax'))
    result = run_cli(env, *COMMAND)
    assert result.returncode == 0, result.stderr
    # Today: nothing said, and every run compiles everything again.
    demo_notice = cli.DEMO_NOTICE.splitlines()
    assert [line for line in result.stderr.splitlines() if line not in demo_notice] == [f'gemma3n: cannot keep compiled programs in {blocker / "jax"} '
                            f'([Errno 20] Not a directory: {str(blocker / "jax")!r}): every run '
                            'compiles them again; set JAX_COMPILATION_CACHE_DIR to a folder '
                            'that can be written']


def test_importing_the_command_starts_no_backend():
    # The cache folder is chosen, and `jax.distributed` joined, after import: a JAX computation
    # at import time (a module-level `jax.random.key`, once) would come before both.
    code = ('import gemma3n, gemma3n.cli, gemma3n.serving.app; from jax._src import xla_bridge; '
            'print(sorted(xla_bridge._backends))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS='cpu'), check=True)
    assert result.stdout.strip() == '[]', result.stdout
