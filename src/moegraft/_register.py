"""Registers moegraft's experts forward with transformers once `transformers.integrations.moe` is loaded.

In: nothing (called by `import moegraft`). Out: `ExpertsInterface` knows "moegraft" — right away if
transformers' MoE integration is already imported, else the moment it is (a one-shot import hook), so that
importing moegraft does not import torch and transformers.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "transformers.integrations.moe"


def _register() -> None:
    import moegraft.experts_impl  # noqa: F401  (registers on import)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds TARGET with the other finders, and wraps its loader to register right after it has run."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the find_spec below from coming back here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_experts_on_import() -> None:
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
