"""Shared test setup: float32 numerics on CPU, the decode kernels compiled inside the repository
(once, shared by every worker and command run: nothing is read from the user's cache), a
compilation cache per worker, XLA's backend compiling without LLVM's optimisations, and the test
helpers' directory on sys.path."""

import os
import sys

import jax
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('GEMMA3N_KERNEL_CACHE', os.path.join(REPO_ROOT, '.cache', 'kernels'))
sys.path.insert(0, os.path.dirname(__file__))

from cli_runner import JAX_CACHE_FOLDER, XLA_TEST_FLAGS  # noqa: E402  (after the path above)

# Read when JAX first starts its backend, which importing does not do.
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache per test worker, for its own process and the commands it
    runs (cli_runner.cli_env): programs built again and again (the demo model's random init, a
    new jit of it per load) compile once. The folder is the worker's: nothing is read from the
    user's cache, and two workers never write one entry."""
    folder = tmp_path_factory.getbasetemp() / JAX_CACHE_FOLDER
    folder.mkdir(exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', str(folder))
    return folder
