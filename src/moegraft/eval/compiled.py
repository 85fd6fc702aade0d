"""A model's forward under `torch.compile` with a static KV cache: how `bench --compile` prefills and decodes.

In: a loaded causal LM and the longest sequence it will see. Out: `forward(ids, position)` over one static cache per
batch size, the logits of the eager forward through a dynamic cache (within 2e-5, fp32:
tests/test_eval.py).

This is transformers' own recipe for compiled generation (its `StaticCache`, documented as the cache that supports
`torch.compile`), written out rather than called through `generate`, because `generate` times prefill and decode
together and compiles only decode. A static cache keeps every shape fixed, so each (batch size, prompt or decode
step) compiles once; on CUDA the mode is "reduce-overhead" (CUDA graphs: one replay per step, where an eager MoE
step launches many small kernels for routing, sorting and the experts, each with its host overhead).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import StaticCache

from moegraft.models import CACHE_ARG

# every (model, experts implementation, batch size, prefill or decode) is its own graph; torch's default of 8
# recompiles per code object would fall back to eager part-way through a bench of three batch sizes
RECOMPILE_LIMIT = 256


def _recompile_limit():
    """A context that raises dynamo's recompile limit (its name since torch 2.6; cache_size_limit before)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch({name: RECOMPILE_LIMIT})


class CompiledDecoder:
    """`torch.compile(model.forward)` over a static KV cache of `max_len` positions, one cache per batch size.

    `start(B)` empties (or makes) the batch's cache; `forward(ids, position)` feeds ids (B, t) at positions
    position … position + t - 1 and returns the logits (B, t, V). On CUDA the logits live in a CUDA graph's
    output buffer until the next call: read what you need (an argmax) before calling again.
    """

    def __init__(self, model: nn.Module, max_len: int):
        self.model = model
        self.max_len = max_len
        self.device = next(model.parameters()).device
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self._forward = torch.compile(model.forward, mode=mode, dynamic=False)
        self._caches: dict[int, StaticCache] = {}
        self._cache: StaticCache | None = None

    def start(self, batch: int) -> None:
        cache = self._caches.get(batch)
        if cache is None:
            cache = self._caches[batch] = StaticCache(config=self.model.config, max_cache_len=self.max_len)
            # A static cache allocates its tensors on its first update. Made inside the first compiled call,
            # that allocation is part of the graph, and the next call (cache allocated) recompiles: ~10 s of a
            # tiny model's CPU compile, and on CUDA a graph recorded during a timed run. One eager token here
            # allocates every layer with the shapes, dtype and device the model itself gives it.
            ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # (B, 1)
            with torch.no_grad():
                self.model(input_ids=ids, use_cache=True, cache_position=ids[0, :1], **{CACHE_ARG: cache})
        cache.reset()  # zeroes in place: the compiled graphs hold these tensors' addresses
        self._cache = cache

    def forward(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        if self._cache is None:
            raise RuntimeError("call start(batch) before forward")
        t = ids.shape[1]
        if position + t > self.max_len:
            raise ValueError(f"positions up to {position + t} exceed the static cache of {self.max_len}")
        pos = torch.arange(position, position + t, device=self.device)  # (t,)
        # dynamo guards on strides: a column sliced from a longer batch would recompile
        ids = ids.contiguous()
        with _recompile_limit():
            out = self._forward(input_ids=ids, use_cache=True, cache_position=pos, **{CACHE_ARG: self._cache})
        return out.logits
