"""Registers moegraft's pieces with transformers once the transformers modules they extend are loaded.

In: nothing (called by `import moegraft`). Out: `ExpertsInterface` knows "moegraft", and the Auto classes know
moegraft's Gemma 2/3 MoE classes (so its checkpoints load without `trust_remote_code`) — right away if the
transformers module is already imported, else the moment it is (a one-shot import hook per module), so that
importing moegraft does not import torch and transformers.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable

TARGET = "transformers.integrations.moe"
AUTO_TARGET = "transformers.models.auto.modeling_auto"


def _register() -> None:
    import moegraft.experts_impl  # noqa: F401  (registers on import)


def _register_models() -> None:
    """moegraft's own model classes with AutoConfig and AutoModelForCausalLM (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moegraft.formats import modeling_moegraft_gemma as gemma

    for config_cls, model_cls in (
        (gemma.MoegraftGemma3TextConfig, gemma.MoegraftGemma3ForCausalLM),
        (gemma.MoegraftGemma2Config, gemma.MoegraftGemma2ForCausalLM),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds `target` with the other finders, and wraps its loader to run `then` right after it has run."""

    def __init__(self, target: str, then: Callable[[], None]):
        self.target, self.then = target, then

    def find_spec(self, name, path, target=None):
        if name != self.target:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the find_spec below from coming back here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        then = self.then

        def exec_then_register(module):
            exec_module(module)
            then()

        spec.loader.exec_module = exec_then_register
        return spec


def _when_imported(target: str, then: Callable[[], None]) -> None:
    if target in sys.modules:
        then()
    elif not any(isinstance(f, _RegisterAfterImport) and f.target == target for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport(target, then))


def register_experts_on_import() -> None:
    _when_imported(TARGET, _register)
    _when_imported(AUTO_TARGET, _register_models)
