"""Router health per MoE layer, accumulated over many forwards of a RouterTap(detach=True).

In: RouterTap records (router logits (T, E), chosen indices (T, K)) batch by batch.
Out: per layer, the fraction of tokens per expert, CV, MaxVio, dead experts, min share, router entropy
(nats and / ln E), mean top-k weight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moegraft.routing import LoadStats, RouterRecord, expert_counts, routing_probs, token_entropy


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer over the whole evaluation set."""

    layer: int
    num_experts: int  # E
    top_k: int  # K
    tokens: int  # tokens routed (each makes K assignments)
    fractions: list[float]  # (E,) share of the (token, slot) assignments per expert; sums to 1
    cv: float  # std / mean of the per-expert counts
    max_vio: float  # max load / mean load - 1
    dead: int  # experts never chosen
    under_10pct: int  # experts below 10% of their fair share 1/E
    entropy: float  # mean per-token entropy of the router distribution (nats); uniform = ln E
    entropy_norm: float  # entropy / ln E: 1 = uniform router (balanced by not choosing), 0 = one-hot
    min_share: float  # least-used expert's load / fair share 1/E; 0 = a dead expert, 1 = perfect balance
    mean_topk_weight: float  # mean router probability of a chosen expert, before any renormalisation

    def to_json(self) -> dict:
        return asdict(self)


def routing_summary(routing: list[LayerRouting]) -> dict:
    """The headline numbers over layers (worst CV, mean H / ln E, worst min share), for reports and the CLI.

    Mean H / ln E goes beside the worst CV because a uniform router (H / ln E = 1) also reads as balanced.
    """
    worst = max(routing, key=lambda r: r.cv)
    least = min(routing, key=lambda r: r.min_share)
    return {
        "worst_cv": worst.cv,
        "worst_cv_layer": worst.layer,
        "mean_entropy_norm": sum(r.entropy_norm for r in routing) / len(routing),
        "worst_min_share": least.min_share,
        "worst_min_share_layer": least.layer,
    }


class RoutingAccumulator:
    """Sums counts, entropy and chosen-expert probability per layer; call `update` after every forward."""

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}  # layer → (E,) int64
        self.tokens: dict[int, int] = {}
        self.entropy: dict[int, float] = {}  # summed over tokens
        self.topk_weight: dict[int, float] = {}  # summed over (token, slot)
        self.top_k: dict[int, int] = {}

    @torch.no_grad()
    def update(self, records: dict[int, list[RouterRecord]]) -> None:
        """Add every record of a tap (then clear the tap, so that the next batch is not counted twice)."""
        for layer, recs in records.items():
            for rec in recs:
                T, E = rec.logits.shape[-2:]
                p = routing_probs(rec.logits, rec.score).reshape(-1, E)  # (T, E)
                idx = rec.indices.reshape(p.shape[0], -1)  # (T, K)
                c = expert_counts(idx, E)
                self.counts[layer] = self.counts.get(layer, torch.zeros(E, dtype=torch.long)) + c.cpu()
                self.tokens[layer] = self.tokens.get(layer, 0) + p.shape[0]
                ent = token_entropy(p)  # (T,)
                self.entropy[layer] = self.entropy.get(layer, 0.0) + float(ent.sum())
                self.topk_weight[layer] = self.topk_weight.get(layer, 0.0) + float(p.gather(1, idx).sum())
                self.top_k[layer] = idx.shape[1]

    def result(self) -> list[LayerRouting]:
        out = []
        for layer in sorted(self.counts):
            n = self.tokens[layer]
            stats = LoadStats.from_counts(self.counts[layer], entropy=self.entropy[layer] / n)
            out.append(
                LayerRouting(
                    layer=layer,
                    num_experts=len(stats.fractions),
                    top_k=self.top_k[layer],
                    tokens=n,
                    fractions=stats.fractions,
                    cv=stats.cv,
                    max_vio=stats.max_vio,
                    dead=stats.dead,
                    under_10pct=stats.under_10pct,
                    entropy=stats.entropy,
                    entropy_norm=stats.entropy_norm,
                    min_share=stats.min_share,
                    mean_topk_weight=self.topk_weight[layer] / (n * self.top_k[layer]),
                )
            )
        return out
