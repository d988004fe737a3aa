"""Test helper: an import-only stand-in for torchvision, so that timm (the MobileNet-V5 oracle)
imports where torchvision cannot be installed.

timm imports torchvision at import time (its data transforms, `FrozenBatchNorm2d`), but the
MobileNet-V5 tower never calls it. PyPI's torchvision wheels for our pinned CPU torch are CUDA
builds that do not load beside it, so torchvision is no test dependency. `import_timm` imports
timm with every torchvision name standing in for nothing: any call into one raises, so no result
can silently come from the stand-in. Where a working torchvision is installed it is used.
`timm_in_transformers` lets transformers build its `TimmWrapperModel` (the Gemma 3n vision tower),
which it otherwise refuses without torchvision.
"""

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from unittest import mock


class _Unavailable:
    """Any name of the stand-in: usable as a base class, decorator target or dict key at import
    time; calling it raises, so nothing can silently compute with it."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        return _Unavailable(f'{self._name}.{attribute}')

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f'{self._name} is a torchvision stand-in: torchvision is not installed')

    def __mro_entries__(self, bases):
        return (object,)


class _Module(types.ModuleType):
    def __getattr__(self, attribute):
        if attribute.startswith('__'):
            raise AttributeError(attribute)
        return _Unavailable(f'{self.__name__}.{attribute}')


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == 'torchvision' or fullname.startswith('torchvision.'):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _forget_torchvision() -> None:
    for name in [name for name in sys.modules if name.split('.')[0] == 'torchvision']:
        del sys.modules[name]


def import_timm():
    """Imports and returns timm, with the stand-in only while timm imports and only if
    torchvision itself does not import. Afterwards torchvision is unknown again (what timm bound
    stays bound), so that others (transformers' image processors) do not take it as installed."""
    try:
        import torchvision  # noqa: F401 (whether it loads)
    except (ImportError, RuntimeError, OSError):
        _forget_torchvision()
        finder = _Finder()
        sys.meta_path.insert(0, finder)
        try:
            importlib.import_module('timm')
        finally:
            sys.meta_path.remove(finder)
            _forget_torchvision()
    return importlib.import_module('timm')


@contextlib.contextmanager
def timm_in_transformers():
    """Within it, transformers takes timm as usable: its backend check for timm (which also asks
    for torchvision) answers yes, and its timm wrapper module holds timm."""
    timm = import_timm()
    from transformers.utils import import_utils
    _, message = import_utils.BACKENDS_MAPPING['timm']
    with mock.patch.dict(import_utils.BACKENDS_MAPPING, {'timm': (lambda: True, message)}):
        from transformers.models.timm_wrapper import modeling_timm_wrapper
        with mock.patch.object(modeling_timm_wrapper, 'timm', timm, create=True):
            yield
