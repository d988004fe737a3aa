"""Test helper: running the `gemma3n` command in a subprocess and checking its one-line errors.

Not a test module. Each test module that runs the command defines a module-scoped `env` fixture
with `cli_env(tmp_path_factory)`: every run of a worker shares its compilation cache.
Command output may hold first-run compile notices: `without_compile_notices` drops them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gemma3n
from gemma3n import cli
from gemma3n.text.chat import ChatSampler
from gemma3n.text.tokenizer import Tokenizer
from gemma3n.transformer import Gemma3nTransformer

JAX_CACHE_FOLDER = 'jax_cache'     # in the worker's base folder
# The suite's small models spend far more time in XLA's compiler than running; LLVM's
# optimisations off cut that (measured: one 10-layer sampler test 288 s -> 183 s on a loaded
# machine; tests/sharding_worker.py, which has always compiled this way, nearly 2x). It only
# changes how fast the machine code runs: HLO passes, fusion and float semantics (no fast math at
# any level) stay the same, so every numeric check holds as at the default level. conftest sets
# it for the tests and the commands they run; subprocesses that set XLA_FLAGS add to it.
XLA_TEST_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'

# A cold run of the demo model compiles for up to ~35 s on a busy 2-core machine.
TIMEOUT_S = 300


def cli_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a command run: CPU, and the worker's compilation cache (conftest's),
    so that the demo model's programs compile once. test_compilation.py, which needs fresh
    caches, makes its own."""
    cache = tmp_path_factory.getbasetemp() / JAX_CACHE_FOLDER
    cache.mkdir(exist_ok=True)
    return dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache))


def run_cli(env: dict[str, str], *args: str, stdin: str = '') -> subprocess.CompletedProcess:
    """`python -m gemma3n ARGS` with `stdin` as its input; its exit status and output."""
    return subprocess.run([sys.executable, '-m', 'gemma3n', *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=TIMEOUT_S)


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The command refused its input with one line on stderr holding every fragment."""
    assert result.returncode == cli.USAGE_ERROR, result
    assert result.stdout == '' and 'Traceback' not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def without_compile_notices(stderr: str) -> str:
    """stderr without the lines announcing a first-run compile (shown or not by the cache's state)."""
    notices = {f'gemma3n: {notice}' for notice in (cli.COMPILING_DEMO, cli.COMPILING_PROMPT)}
    return ''.join(line for line in stderr.splitlines(keepends=True) if line.rstrip() not in notices)


def demo_model() -> tuple[Gemma3nTransformer, dict, Tokenizer]:
    """The demo model, its weights and the shipped tokenizer, as the command loads them."""
    loaded = gemma3n.load()
    return loaded.model, loaded.params, loaded.tokenizer


def demo_chat_sampler(cache_length: int, max_new_tokens: int) -> ChatSampler:
    """A ChatSampler of the demo model as the command builds it."""
    return gemma3n.load().chat(cache_length=cache_length, max_new_tokens=max_new_tokens)
