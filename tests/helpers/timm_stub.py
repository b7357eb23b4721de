"""timm's own modules (the installed wheel) beside the CPU torch wheel: timm's package imports
torchvision, whose PyPI build does not load beside it, and nothing of torchvision is called by the
parts the tests compare against (ViT, the cosine scheduler). A stand-in `torchvision` whose every
submodule and attribute is a dummy is installed first."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest


def timm_module(name: str):
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (scripts/setup.sh installs it without dependencies)")
    if "torchvision" not in sys.modules:

        class _Meta(type):  # a dummy class whose every attribute is a dummy class
            def __getattr__(cls, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return _Meta(name, (), {})

        class _Any(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return _Meta(name, (), {})

        class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):  # torchvision and its submodules
            def find_spec(self, name, path=None, target=None):
                if name == "torchvision" or name.startswith("torchvision."):
                    return importlib.machinery.ModuleSpec(name, self, is_package=True)
                return None

            def create_module(self, spec):
                return _Any(spec.name)

            def exec_module(self, module):
                module.__path__ = []

        sys.meta_path.insert(0, _Stub())
    return importlib.import_module(name)
