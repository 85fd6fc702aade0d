"""A router set from the data: balanced spherical k-means on each layer's router inputs, offsets that make
the top-K loads equal, and a temperature that makes the routing distribution peaked but not one-hot.

In: one layer's router inputs X (N, H) on calibration tokens (what the router's weight multiplies). Out: a
FittedRouter, whose weight (E, H) is written as the format's router weight, and its held-out statistics.

Why the pieces:
- k-means centroids alone route unevenly (held-out worst-layer CV ~1.0 on SmolLM2): tokens cluster, but the
  clusters' margins are not equal. A per-expert offset, fitted until every expert is in the top-K of the same
  number of calibration tokens, fixes that on the calibration text.
- On other text the loads drift apart again when the clusters are topics: in late layers much of a token's
  variation is shared by its whole block (what the text is about), and a router that routes by topic is
  balanced only on the topic mix it was fitted on (SmolLM2 layer 28, held-out documents: CV 0.52). So the
  centroids are fitted, and route, in the space orthogonal to the TOPIC_DIMS main directions of between-block
  variation (0.22 on the same documents): experts split tokens by what varies inside a text.
- Qwen2-MoE's and Gemma 4's routers have no bias, so the offset folds into the weight along u = μ/|μ|²
  (μ = the mean router input): x·u is nearly constant (≈ 1) for normalised hidden states, so
  w_e + γ_e·u adds ≈ γ_e to expert e's logit for every token. The fit runs on the folded weight itself, so
  what is measured is what the checkpoint computes.
- Top-K selection does not depend on a common scale of the logits; the softmax weights do. The scale τ is
  chosen so that the mean normalised entropy H/ln E on held-out tokens is the spec's router_entropy: one that
  routes (a uniform one has 1.0) and whose gradients do not vanish (a one-hot one has 0).
- Sigmoid scores (GLM-4.5 MoE) are bounded: their normalised entropy falls with τ only until every score is 0
  or 1, so a low target can be out of reach at any scale (8 experts, 0.6: the bisection ran to τ = e^8 on
  SmolLM2, logits in the thousands). Saturated sigmoids pass no gradient, and the z-loss logsumexp² of such
  logits is ~1e6, which wrecked training (the glm4_moe graft's perplexity went from 19 to 1342 in 40 steps).
  So for sigmoid scores τ is also capped at the scale that gives held-out logits an RMS of SIGMOID_LOGIT_RMS.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moegraft.routing import routing_probs

HELDOUT_FRACTION = 0.25  # share of calibration blocks (the last ones) kept out of the fit to measure it
KMEANS_ITERS = 25
KMEANS_TOKENS = 4096  # tokens that place the centroids (offsets and τ use every fit / held-out token)
SINKHORN_ITERS = 20
SINKHORN_EPS = 0.05  # entropic regularisation of the balanced assignment, in cosine-similarity units
# Largest held-out logit RMS a sigmoid router starts from: σ'(4) ≈ 0.018, still learning; logsumexp² of 8 such
# logits ~1e2, so the z-loss (coefficient 1e-3) stays a small term beside the next-token loss.
SIGMOID_LOGIT_RMS = 4.0
OFFSET_ITERS = 300
TOPIC_DIMS = 8  # directions of between-block variation the router is made blind to


@dataclass(frozen=True)
class FittedRouter:
    """One layer's data-set router and how it routes held-out calibration tokens."""

    layer: int
    weight: torch.Tensor  # (E, H): logits = x @ weight.T
    temperature: float  # τ, the common scale of the logits
    heldout_cv: float  # std / mean of the top-K loads on held-out tokens
    heldout_min_share: float  # least-used expert's load / fair share, held out
    heldout_entropy_norm: float  # mean H / ln E of the routing distribution, held out

    def stats(self) -> dict:
        return {
            "router_temperature": round(self.temperature, 5),
            "heldout_cv": round(self.heldout_cv, 4),
            "heldout_min_share": round(self.heldout_min_share, 4),
            "heldout_entropy_norm": round(self.heldout_entropy_norm, 4),
        }


def topk_loads(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(E,) share of (token, slot) assignments each expert gets from logits (N, E); sums to 1."""
    idx = torch.topk(logits, top_k, dim=-1).indices  # (N, K)
    counts = torch.bincount(idx.reshape(-1), minlength=logits.shape[-1]).double()
    return counts / counts.sum()


def mean_entropy_norm(logits: torch.Tensor, score: str) -> float:
    """Mean per-token entropy of the routing distribution, divided by ln E."""
    E = logits.shape[-1]
    p = routing_probs(logits, score)
    h = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    return float(h / math.log(E)) if E > 1 else 0.0


def fit_offsets(S: torch.Tensor, U: torch.Tensor, top_k: int, iters: int = OFFSET_ITERS) -> torch.Tensor:
    """γ (E,) such that the top-K loads of S + γ·U are (nearly) equal.

    Args:
        S: (N, E) logits without offsets.
        U: (N,) each token's x·u (≈ 1): how much of γ_e reaches its logit.

    A multiplicative-weights style update, γ_e += η·(fair − load_e)/fair, with η shrinking from the logits'
    spread to a hundredth of it; the γ with the lowest load CV seen is kept (the last step may overshoot).
    """
    E = S.shape[1]
    fair = 1.0 / E
    spread = float(S.std()) or 1.0
    gamma = torch.zeros(E, dtype=S.dtype, device=S.device)
    best, best_cv = gamma.clone(), math.inf
    for t in range(iters):
        load = topk_loads(S + U[:, None] * gamma, top_k)  # (E,)
        cv = float(load.std(unbiased=False) / load.mean())
        if cv < best_cv:
            best, best_cv = gamma.clone(), cv
        if cv < 1e-3:
            break
        eta = spread * 0.5 * (0.01 ** (t / iters))
        gamma += eta * ((fair - load) / fair).to(S.dtype)
    return best


def balanced_labels(sim: torch.Tensor) -> torch.Tensor:
    """Labels (n,) from similarities (n, k), (nearly) n/k per column: Sinkhorn's entropic balanced transport.

    Exact equal sizes are not needed to place centroids; Sinkhorn costs a few matrix-vector products per
    iteration where a greedy exact assignment loops over all n·k pairs in Python (~1 s per layer).
    """
    P = torch.exp((sim - sim.max(-1, keepdim=True).values).double() / SINKHORN_EPS)  # (n, k), row max 1
    b = torch.ones(P.shape[1], dtype=P.dtype, device=P.device)
    for _ in range(SINKHORN_ITERS):
        a = 1.0 / (P @ b)  # (n,) row scaling
        b = 1.0 / (P.T @ a).clamp_min(1e-300)  # (k,) column scaling
    return (P * b).argmax(-1)


def spherical_kmeans(Z: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Centroids (k, d) of unit rows Z (n, d): spherical k-means with balanced (Sinkhorn) assignments."""
    C = Z[torch.randperm(len(Z), generator=gen)[:k]].clone()  # (k, d)
    labels = None
    for _ in range(KMEANS_ITERS):
        new = balanced_labels(Z @ C.T)  # (n, k) cosine similarities
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        C = F.one_hot(labels, k).T.to(Z.dtype) @ Z  # (k, d): sum of each cluster's rows
        C = C / C.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return C


def topic_directions(Xc: torch.Tensor, block_len: int, dims: int) -> torch.Tensor:
    """(r, H) orthonormal main directions of between-block variation of centred inputs Xc (N·T, H), r ≤ dims."""
    means = Xc[: len(Xc) - len(Xc) % block_len].view(-1, block_len, Xc.shape[1]).mean(1)  # (blocks, H)
    r = min(dims, len(means) - 1)
    if r < 1:
        return Xc.new_zeros(0, Xc.shape[1])
    _, _, Vh = torch.linalg.svd(means - means.mean(0), full_matrices=False)  # Vh (blocks, H)
    return Vh[:r]


def _temperature(logits: torch.Tensor, score: str, target: float) -> float:
    """τ with mean H/ln E of τ·logits ≈ target (bisection in log τ; entropy falls as τ grows)."""
    lo, hi = -8.0, 8.0
    if mean_entropy_norm(logits * math.exp(hi), score) > target:  # cannot get that peaked: take the most
        return math.exp(hi)
    if mean_entropy_norm(logits * math.exp(lo), score) < target:
        return math.exp(lo)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if mean_entropy_norm(logits * math.exp(mid), score) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


@contextmanager
def _one_thread():
    """The fit is hundreds of small (N, E) ops: with several threads their synchronisation costs more than
    the arithmetic (seen: 0.4 s per layer on one thread, 3-4 s on two cores that other work also uses)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def fit_router(
    layer: int,
    X: torch.Tensor,
    num_experts: int,
    top_k: int,
    *,
    block_len: int,
    entropy: float,
    score: str = "softmax",
    seed: int = 0,
) -> FittedRouter:
    """Fit one layer's router from its inputs X (N·T, H) on calibration blocks of `block_len` tokens.

    The last HELDOUT_FRACTION of the blocks only measure the result. Centroids come from balanced spherical
    k-means on the centred inputs of the rest, with the topic directions projected out; offsets (folded into
    the weight) equalise the top-K loads on the fit tokens; τ sets the held-out mean H/ln E to `entropy`
    (sigmoid scores: τ at most the scale of held-out logit RMS SIGMOID_LOGIT_RMS).
    """
    with _one_thread():
        return _fit_router(layer, X.float(), num_experts, top_k, block_len, entropy, score, seed)


def _fit_router(layer, X, E, K, block_len, entropy, score, seed) -> FittedRouter:
    blocks = len(X) // block_len
    n_fit = block_len * max(1, round(blocks * (1 - HELDOUT_FRACTION))) if blocks > 1 else len(X)
    fit, held = X[:n_fit], (X[n_fit:] if n_fit < len(X) else X)
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    mu = fit.mean(0)  # (H,)
    u = mu / mu.pow(2).sum().clamp_min(1e-12)  # (H,): x·u ≈ 1
    if E == 1:
        C = torch.zeros(1, X.shape[1], device=X.device)
    else:
        Zc = fit - mu  # (N, H)
        P = topic_directions(Zc, block_len, TOPIC_DIMS)  # (r, H)
        Zc = Zc - (Zc @ P.T) @ P
        sub = Zc[torch.randperm(len(Zc), generator=g)[:KMEANS_TOKENS]]  # (n, H)
        C = spherical_kmeans(sub / sub.norm(dim=1, keepdim=True).clamp_min(1e-8), E, g)  # (E, H)
        C = C - (C @ P.T) @ P  # route blind to topic, as the centroids were fitted
        # x·(c_e - (c_e·μ)·u) = x·c_e - (c_e·μ)(x·u) ≈ (x - μ)·c_e: score the centred input
        C = C - (C @ mu)[:, None] * u[None]
    S = fit @ C.T  # (N_fit, E)
    gamma = fit_offsets(S, fit @ u, K)
    W = C + gamma[:, None] * u[None]  # (E, H): offsets folded along u
    raw = held @ W.T  # (N_held, E): held-out logits at τ = 1
    tau = _temperature(raw, score, entropy)
    if score == "sigmoid":
        rms = float(raw.pow(2).mean().sqrt())
        tau = min(tau, SIGMOID_LOGIT_RMS / max(rms, 1e-12))
    W = tau * W
    held_logits = held @ W.T  # (N_held, E)
    load = topk_loads(held_logits, K)
    return FittedRouter(
        layer=layer,
        weight=W.contiguous(),
        temperature=tau,
        heldout_cv=float(load.std(unbiased=False) / load.mean()),
        heldout_min_share=float(load.min() * E),
        heldout_entropy_norm=mean_entropy_norm(held_logits, score),
    )
