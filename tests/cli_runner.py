"""Test helper: running the `gemma3n` command in a subprocess and checking its one-line errors.

Not a test module. Each test module that runs the command defines its own module-scoped `env`
fixture with `cli_env(tmp_path_factory)`, so its runs share one compilation cache.
"""

from __future__ import annotations

import os
import subprocess
import sys

from gemma3n import cli

# A cold run of the demo model compiles for up to ~35 s on a busy 2-core machine.
TIMEOUT_S = 300


def cli_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a command run: CPU, and a compilation cache of the test module's own."""
    return dict(os.environ, JAX_PLATFORMS='cpu',
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')))


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
