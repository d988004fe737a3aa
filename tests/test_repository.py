"""The repository stands on its own: CI runs README's test command on a copy with nothing beside it."""

import ast
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


# The package's layers, bottom to top (docs/architecture.md §7). A module may import modules of
# its own layer or below, never above: the model must run without the text, checkpoint or
# command code, and checkpoints must load without the text code. Keys are module names
# relative to `gemma3n` (a package name covers everything in it); every module must be listed,
# so a new one is placed deliberately.
LAYERS = (
    ('building blocks', ('layers', 'sharding')),
    ('the model', ('config', 'attention', 'ffn', 'sparse_rows', 'altup', 'laurel', 'per_layer', 'block',
                   'embedder', 'multimodal', 'multimodal_embedder', 'model_inputs', 'transformer', 'cache',
                   'models', 'schema', 'memory', 'validation', 'host_arrays', 'compilation', 'compiler_options',
                   'exported_programs', 'freed_memory',
                   'vision', 'audio', 'towers', 'towers_config')),
    ('checkpoints', ('checkpoints', 'layout')),
    ('the generation engine', ('engine',)),
    ('text and generation', ('text',)),
    ('serving', ('serving',)),
    ('loading and description', ('loading', 'loaded_model', 'load_error', 'model_choice', 'converted',
                                  'tower_checks', 'describe')),
    ('training', ('training',)),
    ('the command and the package', ('cli', '__init__', '__main__')),
)
PACKAGE = ROOT / 'gemma3n'


def _module_name(path: pathlib.Path) -> str:
    """gemma3n/text/chat.py -> 'text.chat'; gemma3n/__init__.py -> '__init__'."""
    parts = path.relative_to(PACKAGE).with_suffix('').parts
    if len(parts) > 1 and parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(parts)


def _layer_of(module: str) -> int:
    """The index in LAYERS of the layer holding `module` (a name relative to gemma3n)."""
    for index, (_, members) in enumerate(LAYERS):
        if any(module == m or module.startswith(m + '.') for m in members):
            return index
    raise AssertionError(f'gemma3n.{module} is in no layer: add it to LAYERS in '
                         f'tests/test_repository.py and to docs/architecture.md §7.')


def _imported_modules(path: pathlib.Path) -> set[str]:
    """The gemma3n modules `path` imports (anywhere in it), relative to gemma3n.

    `from gemma3n.x import y` names module x.y when y is a module, else x; `from gemma3n import
    y` names the package itself ('__init__') when y is not a module.
    """
    def resolve(dotted: str) -> str:
        relative = dotted.split('.')[1:]
        if not relative:
            return '__init__'
        exists = (PACKAGE.joinpath(*relative).with_suffix('.py').exists()
                  or PACKAGE.joinpath(*relative).is_dir())
        return '.'.join(relative) if exists else resolve('.'.join(dotted.split('.')[:-1]))

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.split('.')[0] == 'gemma3n'}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f'{path}: use absolute imports (from gemma3n...).')
            if node.module and node.module.split('.')[0] == 'gemma3n':
                found |= {resolve(f'{node.module}.{a.name}') for a in node.names}
    return found


def test_imports_only_go_downward():
    upward = []
    for path in sorted(PACKAGE.rglob('*.py')):
        module = _module_name(path)
        layer = _layer_of(module)
        upward += [f'gemma3n.{module} ({LAYERS[layer][0]}) imports gemma3n.{target} '
                   f'({LAYERS[_layer_of(target)][0]})'
                   for target in sorted(_imported_modules(path)) if _layer_of(target) > layer]
    assert not upward, 'imports from a higher layer:\n' + '\n'.join(upward)


def test_the_import_check_sees_upward_imports(tmp_path):
    # The check must resolve the import forms the package uses, or it passes vacuously.
    source = tmp_path / 'example.py'
    source.write_text('import gemma3n.text.tokenizer\nfrom gemma3n import cache as c, Output\n'
                      'from gemma3n.checkpoints.loader import load_params\n'
                      'def f():\n    from gemma3n.cli import main\n')
    assert _imported_modules(source) == {'text.tokenizer', 'cache', '__init__',
                                         'checkpoints.loader', 'cli'}
    assert [_layer_of(m) for m in ('layers.einsum', 'transformer', 'checkpoints.loader', 'text',
                                   'training.step', 'cli.parser')] == [0, 1, 2, 4, 7, 8]


# One concept per module (docs/architecture.md §7): a module past this many lines holds more than
# one, and is split along its seams.
MAX_MODULE_LINES = 400


# The C++ kernels' sources too (layers/kernels/*.cc, *.h).
SOURCE_PATTERNS = ('*.py', '*.cc', '*.h')


def test_no_module_is_over_the_line_limit():
    sources = sorted(path for pattern in SOURCE_PATTERNS for path in PACKAGE.rglob(pattern))
    assert any(path.suffix == '.h' for path in sources)      # the kernels' headers are seen
    long = {str(path.relative_to(ROOT)): lines for path in sources
            if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, (f'modules over {MAX_MODULE_LINES} lines, to split along their seams (one '
                      f'concept per module): {long}')
