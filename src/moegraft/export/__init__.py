"""Export a moegraft MoE checkpoint to other runtimes, proving each export computes the same function.

In: a converted (or trained) MoE directory. Out: a GGUF file for llama.cpp, written by llama.cpp's own
converter from an export-ready copy that transformers and llama.cpp read the same way.
"""

from importlib import import_module

# lazy, so that `moegraft --help` does not import torch and transformers
_WHERE = {
    "ExportError": "moegraft.export.base",
    "GGUFTarget": "moegraft.export.base",
    "ExportResult": "moegraft.export.gguf",
    "export_gguf": "moegraft.export.gguf",
    "pick_target": "moegraft.export.gguf",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(name)


__all__ = list(_WHERE)
