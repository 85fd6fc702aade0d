"""Evaluation and speed: `evaluate` (perplexity, KL to the dense model, router health, report) and `bench`.

In: a model and its dense baseline. Out: EvalResult / BenchResult (and a report directory, a JSON file).
Names are imported lazily so that `moegraft --help` does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "moegraft.eval.evaluate",
    "EvalResult": "moegraft.eval.result",
    "bench": "moegraft.eval.bench",
    "BenchResult": "moegraft.eval.bench",
    "set_experts_impl": "moegraft.eval.experts",
    "DEFAULT_EXPERTS_IMPL": "moegraft.eval.experts",
    "write_report": "moegraft.eval.report",
    "run_lm_eval": "moegraft.eval.harness",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moegraft.eval' has no attribute {name!r}")
