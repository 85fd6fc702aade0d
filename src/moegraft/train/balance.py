"""Load-balancing terms for router training, computed per MoE layer from RouterTap records.

In: each layer's router logits (T, E) with grad and chosen indices (T, K). Out: the Switch/GShard auxiliary
loss and the router z-loss (both averaged over layers), and DeepSeek-V3's aux-loss-free selection-bias update.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moegraft.routing import RouterRecord, expert_counts, router_modules, routing_probs

# Sums a tensor over all processes (identity on one process); passed in so this module needs no accelerator.
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def switch_loss(rec: RouterRecord, counts: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's Switch/GShard loss E · Σ_i f_i · P_i.

    f_i = share of tokens sent to expert i (count_i / T, so Σ f = K) — the same scale as transformers'
    `load_balancing_loss_func`, so the coefficient means what `router_aux_loss_coef` means; perfect balance
    reads K. P_i = mean routing probability of expert i. f carries no gradient; P does.

    Args:
        rec: the layer's router record, logits (T, E), indices (T, K).
        counts: (E,) assignments to use for f (e.g. summed over processes); default: from `rec.indices`.
    """
    T, E = rec.logits.shape
    if counts is None:
        counts, tokens = expert_counts(rec.indices, E), T
    else:
        tokens = counts.sum() / rec.indices.shape[-1]  # assignments / K
    f = counts.to(rec.logits.dtype) / tokens  # (E,)
    P = routing_probs(rec.logits, rec.score).mean(0)  # (E,)
    return E * (f * P).sum()


def z_loss(rec: RouterRecord) -> torch.Tensor:
    """One layer's router z-loss: mean over tokens of logsumexp(logits)² (keeps logits small, ST-MoE)."""
    return torch.logsumexp(rec.logits, dim=-1).pow(2).mean()


def layer_counts(records: dict[int, list[RouterRecord]], num_experts: int) -> dict[int, torch.Tensor]:
    """Layer → (E,) assignment counts over every recorded forward."""
    return {
        layer: sum(expert_counts(r.indices, num_experts) for r in recs)
        for layer, recs in records.items()
        if recs
    }


def balance_losses(
    records: dict[int, list[RouterRecord]],
    *,
    aux: bool,
    z: bool,
    reduce: Reduce = _identity,
    prior: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux, z) losses of the last forward, each averaged over MoE layers (zero tensors when off).

    Per layer, not pooled over layers as transformers does: pooling lets one layer's imbalance cancel another's.
    `reduce` sums each layer's counts over processes, so that f (and so the loss and its gradient) is the one a
    single process would compute on the whole global batch.

    Args:
        records: layer → router records; the last one of each layer is this micro-batch's forward.
        aux, z: compute the Switch loss / the z-loss.
        reduce: sums a tensor over processes.
        prior: layer → (E,) this process's counts of the optimizer step's earlier micro-batches. They are
            added before `reduce`, so f is the token share over the whole step so far, on all processes
            (Qwen's global-batch balance): a micro-batch only has to be balanced with the rest of the step,
            not on its own, and at the last micro-batch f is exactly the global batch's. None = this one only.
    """
    recs = [(layer, r[-1]) for layer, r in sorted(records.items()) if r]
    zero = torch.zeros((), device=recs[0][1].logits.device) if recs else torch.zeros(())
    aux_loss, z_l = zero, zero
    prior = prior or {}
    if aux and recs:
        losses = []
        for layer, r in recs:
            c = expert_counts(r.indices, r.logits.shape[-1])  # (E,) this micro-batch
            if layer in prior:
                c = c + prior[layer]  # (E,) the step so far
            losses.append(switch_loss(r, reduce(c)))
        aux_loss = torch.stack(losses).mean()
    if z and recs:
        z_l = torch.stack([z_loss(r) for _, r in recs]).mean()
    return aux_loss, z_l


@torch.no_grad()
def update_selection_bias(model: nn.Module, counts: dict[int, torch.Tensor], rate: float) -> None:
    """DeepSeek-V3 aux-loss-free balancing: b_i += rate · sign(mean load − load_i), per layer.

    Raises the selection bias of under-loaded experts and lowers it for over-loaded ones; the bias only
    changes which experts are chosen, not their weights. Call after each optimizer step with that step's
    (global) counts.
    """
    for layer, (mod, _) in router_modules(model).items():
        if layer not in counts:
            continue
        bias = mod.e_score_correction_bias  # (E,)
        c = counts[layer].to(bias.device, torch.float32)
        bias.add_(rate * torch.sign(c.mean() - c))
