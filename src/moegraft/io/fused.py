"""Phi-3's fused projections seen as Llama's separate ones, while streaming.

In: a Source whose layers hold `self_attn.qkv_proj.weight` (q; k; v rows) and `mlp.gate_up_proj.weight` (gate; up
rows). Out: the same Source with each fused tensor replaced, in place, by q/k/v_proj and gate/up_proj — the keys
every output format and the dense-FFN reader expect. A split is a row slice: exact, nothing recomputed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moegraft.errors import SourceError
from moegraft.io.source import Source

# model_type -> the fused families this module knows; any other source passes through untouched
FUSED_TYPES = ("phi3",)


def split_rows(config: dict) -> dict[str, tuple[tuple[str, int], ...]]:
    """Fused key suffix -> ((split key suffix, rows), ...) in the order the fused rows hold them.

    Phi3Attention reads q, k, v in that order from qkv_proj's output; Phi3MLP chunks gate_up_proj's output in
    two halves, gate first (`gate, up_states = up_states.chunk(2, dim=-1)`).
    """
    H = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or H // heads)
    I = int(config["intermediate_size"])
    return {
        "self_attn.qkv_proj.weight": (
            ("self_attn.q_proj.weight", heads * hd),
            ("self_attn.k_proj.weight", kv * hd),
            ("self_attn.v_proj.weight", kv * hd),
        ),
        "mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", I), ("mlp.up_proj.weight", I)),
    }


class UnfusedSource:
    """`source` with every fused tensor presented as its parts (each part read as a slice of the fused tensor)."""

    def __init__(self, source: Source, rows: dict[str, tuple[tuple[str, int], ...]]):
        self.inner = source
        self.config, self.origin = source.config, source.origin
        # split name -> (fused name, first row, rows)
        self._parts: dict[str, tuple[str, int, int]] = {}
        self._names: list[str] = []
        for name in source.tensor_names():
            suffix = next((s for s in rows if name.endswith("." + s)), None)
            if suffix is None:
                self._names.append(name)
                continue
            prefix = name.removesuffix(suffix)
            start = 0
            for part, n in rows[suffix]:
                self._parts[prefix + part] = (name, start, n)
                self._names.append(prefix + part)
                start += n
            if start != source.shape(name)[0]:
                raise SourceError(
                    f"{source.origin}: {name} has {source.shape(name)[0]} rows, but config.json's sizes give {start}; "
                    "the config does not match the weights"
                )
        self._last: tuple[str, torch.Tensor] | None = (
            None  # the fused tensor read last: its parts come in a row
        )

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._parts:
            fused, _, n = self._parts[name]
            return (n, *self.inner.shape(fused)[1:])
        return self.inner.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._parts[name][0] if name in self._parts else name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._parts:
            return self.inner.get(name)
        fused, start, n = self._parts[name]
        if self._last is None or self._last[0] != fused:
            self._last = (fused, self.inner.get(fused))
        return self._last[1][start : start + n].clone()  # (n, H): its own storage, so the fused one can go

    def copy_aux(self, out_dir: Path) -> None:
        self.inner.copy_aux(out_dir)

    def close(self) -> None:
        self._last = None
        self.inner.close()


def unfuse(source: Source) -> Source:
    """`source` with Phi-3's fused projections split (UnfusedSource), or `source` itself for any other family."""
    text = source.config.get("text_config") or source.config
    if text.get("model_type") not in FUSED_TYPES:
        return source
    return UnfusedSource(source, split_rows(text))
