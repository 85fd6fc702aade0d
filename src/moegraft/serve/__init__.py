"""Serving what moegraft writes: the same prompts through vLLM and llama.cpp, compared with transformers.

In: a checkpoint directory and real text. Out: per runtime, greedy tokens identical to transformers' and the
largest logprob / logit difference, or the one-line reason the runtime cannot run it.
"""

from importlib import import_module

# lazy, so that `moegraft --help` does not import torch and transformers
_WHERE = {
    "ParityReport": "moegraft.serve.parity",
    "RuntimeParity": "moegraft.serve.compare",
    "run_parity": "moegraft.serve.parity",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(name)


__all__ = list(_WHERE)
