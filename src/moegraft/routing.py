"""Router taps and load statistics: what each MoE layer's router saw and chose, for losses and reports.

In: a loaded MoE model (Qwen2-MoE, GLM-4.5 MoE, Gemma 4 MoE). Out: per layer, router logits (T, E) with
their gradient, chosen expert indices (T, K), and load statistics (fractions, CV, MaxVio, dead experts,
min share, entropy / ln E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class RouterRecord:
    """One router call: logits (T, E), chosen indices (T, K); `score` says how logits become weights."""

    logits: torch.Tensor
    indices: torch.Tensor
    score: str  # "softmax" (Qwen2-MoE, Gemma 4) or "sigmoid" (GLM-4.5 MoE)


def router_modules(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """Layer index → (router module, score function) for every MoE layer of a native MoE model."""
    found: dict[int, tuple[nn.Module, str]] = {}
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls.endswith(("MoeTopKRouter", "MoeTopkRouter", "TextRouter")):
            layer = int(name.split("layers.")[1].split(".")[0])
            found[layer] = (mod, "sigmoid" if cls == "Glm4MoeTopkRouter" else "softmax")
    return dict(sorted(found.items()))


@dataclass
class RouterTap:
    """Context manager recording every router call of `model` (keeps the autograd graph of the logits).

    `records[layer]` is a list (one entry per forward) so that gradient accumulation and generation work.

    Every router gets the same hook, run outside `torch.compile`: `train --compile` compiles the decoder layer once
    for all layers, and dynamo guards on what it traces, so a hook per layer (or one that read its layer inside
    the trace) made it compile every layer anew, and past its recompile limit (8) run the rest eagerly.
    """

    model: nn.Module
    detach: bool = False
    records: dict[int, list[RouterRecord]] = field(default_factory=dict)
    # False: calls are not recorded (backward under gradient checkpointing re-runs the routers; not new routing)
    recording: bool = True

    def __enter__(self) -> RouterTap:
        self._routers = {mod: (layer, score) for layer, (mod, score) in router_modules(self.model).items()}
        if not self._routers:
            raise ValueError(f"{type(self.model).__name__} has no MoE router")
        hook = torch.compiler.disable(self._record)  # one graph break per router, outside the trace
        self._handles = [mod.register_forward_hook(hook) for mod in self._routers]
        return self

    def _record(self, mod: nn.Module, args, output) -> None:
        if not self.recording:
            return
        layer, score = self._routers[mod]
        if hasattr(mod, "proj"):  # Gemma4TextRouter returns probabilities; recompute its logits
            logits = mod.proj(mod.norm(args[0]) * mod.scale * mod.scalar_root_size)
        else:
            logits = output[0]
        if self.detach:
            logits = logits.detach()
        self.records.setdefault(layer, []).append(RouterRecord(logits.float(), output[2].detach(), score))

    def clear(self) -> None:
        self.records.clear()

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) number of (token, slot) assignments to each expert, from indices (T, K)."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts)


@dataclass(frozen=True)
class LoadStats:
    """Load of one layer's experts: fractions sum to 1 over experts."""

    fractions: list[float]
    cv: float  # std / mean of the counts
    max_vio: float  # max load / mean load - 1
    dead: int  # experts never chosen
    under_10pct: int  # experts below 10% of their fair share
    entropy: float  # mean per-token entropy of the router distribution (nats)
    # entropy / ln E: 1 = uniform router probabilities (no preference at all), 0 = one-hot; NaN if unknown.
    # Shown next to CV / MaxVio so that a balancing method cannot look good by making routing uniform.
    entropy_norm: float
    min_share: float  # least-used expert's load / its fair share 1/E (E · min fraction; 0 = a dead expert)

    @classmethod
    def from_counts(cls, counts: torch.Tensor, entropy: float = float("nan")) -> LoadStats:
        c = counts.double()
        E = len(c)
        mean = c.mean()
        frac = c / c.sum().clamp_min(1)
        fair = 1.0 / E
        return cls(
            fractions=frac.tolist(),
            cv=float(c.std(unbiased=False) / mean) if mean > 0 else 0.0,
            max_vio=float(c.max() / mean - 1) if mean > 0 else 0.0,
            dead=int((c == 0).sum()),
            under_10pct=int((frac < 0.1 * fair).sum()),
            entropy=entropy,
            # one expert has no choice to spread over (ln 1 = 0): call it fully peaked
            entropy_norm=entropy / math.log(E) if E > 1 else 0.0,
            min_share=float(frac.min()) * E,
        )


def routing_probs(logits: torch.Tensor, score: str) -> torch.Tensor:
    """(T, E) per-token routing distribution from router logits (T, E), in fp32: softmax, or sigmoid scores
    normalised to sum 1 (GLM-4.5 / DeepSeek-V3). Keeps the logits' gradient."""
    logits = logits.float()
    if score == "softmax":
        return torch.softmax(logits, dim=-1)
    s = torch.sigmoid(logits)
    return s / s.sum(-1, keepdim=True)


def token_entropy(p: torch.Tensor) -> torch.Tensor:
    """(T,) entropy in nats of each token's routing distribution p (T, E)."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def router_entropy(rec: RouterRecord) -> float:
    """Mean per-token entropy (nats) of the routing distribution (softmax, or normalised sigmoid)."""
    return float(token_entropy(routing_probs(rec.logits.detach(), rec.score)).mean())
