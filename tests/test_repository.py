"""The repository stands on its own: CI runs README's test command on a copy with nothing beside it."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_COMMAND_END = 'python -m pytest -n 2 -q'


def test_ci_runs_the_readme_test_command_on_an_isolated_copy():
    readme = [line for line in (ROOT / 'README.md').read_text().splitlines()
              if line.endswith(TEST_COMMAND_END)]
    script = (ROOT / '.ci' / 'run').read_text().splitlines()
    assert len(readme) == 1, 'README.md must give exactly one test command'
    assert [line for line in script if line.endswith(TEST_COMMAND_END)] == readme
    # The command runs in a fresh temporary directory, not in the checkout (see .ci/run).
    assert 'mktemp -d' in '\n'.join(script)
