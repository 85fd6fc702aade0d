"""Carving a dense FFN into an always-on shared part and routed experts, from calibration activations.

In: one layer's FFN inputs X (N, H) and its dense gate/up (I, H), down (H, I). Out: a CarvedLayer (which
dense neurons go to the shared expert and to each routed expert, and a router fitted to the data), and
CarveInit, which serves the output format the carved weights the way ExpertInit serves grafted ones.

Scaling (Qwen2-MoE): the router's softmax gives expert e a weight w_e; with every expert chosen and equal
weights, w_e = w0 (1/E, or 1/K when renormalised). Expert down_proj is multiplied by 1/w0 and the shared
expert's by 2 (its sigmoid gate has weight 0: sigmoid(0) = 0.5), so in that case
shared + Σ_e experts = Σ over all dense neurons = the dense FFN, exactly. With top-K < E the carved layer
computes shared + Σ_{e in top-K} (w_e / w0) · expert_e: the router's scale (a temperature, fitted per
layer on calibration tokens) decides how far the chosen experts' factors w_e / w0 stray from 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moegraft.calibrate import LoadedWeights, dense_mlp_weights, ffn_inputs_by_layer, mlp_act
from moegraft.config import GraftSpec
from moegraft.errors import SpecError
from moegraft.init.experts import DenseFFN

# Router temperatures tried per layer (logits are first scaled to unit std): small ones keep every chosen
# expert's factor near 1 (the plain "run the top-K experts" carve), larger ones let the router weigh them.
TEMPERATURES = (0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
KMEANS_ITERS = 25
CLUSTER_TOKENS = 2048  # calibration tokens whose activations describe each neuron for clustering
FIT_TOKENS = 2048  # calibration tokens used to choose the temperature
RIDGE = 1e-2  # router least squares: ridge, relative to the mean eigenvalue of X^T X
# down-projection refit (carve_fit="lstsq"): ridges toward the dense columns, relative to the mean eigenvalue of
# Phi^T Phi, tried on the first 80% of the calibration tokens and judged on the last 20% (whole blocks)
LSTSQ_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)
LSTSQ_HOLDOUT = 0.2


@dataclass(frozen=True)
class CarvedLayer:
    """Where one layer's dense neurons went, and the router that picks among them."""

    layer: int
    shared: torch.Tensor  # (S,) dense neuron indices of the shared expert, sorted
    experts: torch.Tensor  # (E, I_e) dense neuron indices of each routed expert, rows sorted
    router: torch.Tensor  # (E, H) router weight: logits = x @ router.T
    temperature: float  # the chosen scale of the unit-std least-squares logits
    calib_hit_rate: float  # calibration tokens whose top-K holds the expert with the most activation mass
    calib_rel_error: float  # ||carved FFN - dense FFN||^2 / ||dense FFN||^2 on calibration tokens
    down: torch.Tensor | None = (
        None  # (H, I) refitted down projection of every dense neuron (carve_fit lstsq)
    )
    calib_rel_error_dense_down: float | None = None  # the same error with the dense columns, for comparison
    down_file: Path | None = None  # where `down` waits on disk instead (carve_model's `spill`)

    def down_proj(self) -> torch.Tensor | None:
        """(H, I) the refitted down projection, read back if it was spilled; None: the dense columns stay."""
        return self.down if self.down_file is None else read_spilled(self.down_file)

    def cpu(self) -> CarvedLayer:
        """This carve with its tensors in host memory (calibration on a GPU computes them there)."""
        if all(
            t is None or t.device.type == "cpu" for t in (self.shared, self.experts, self.router, self.down)
        ):
            return self
        down = None if self.down is None else self.down.cpu()
        return replace(
            self, shared=self.shared.cpu(), experts=self.experts.cpu(), router=self.router.cpu(), down=down
        )

    def spilled(self, directory: Path) -> CarvedLayer:
        """This carve with its refitted down projection written to `directory` and dropped from memory."""
        if self.down is None:
            return self
        path = Path(directory) / f"down.{self.layer}.{id(self)}.safetensors"
        save_file({"down": self.down.cpu().contiguous()}, path)
        return replace(self, down=None, down_file=path)

    def record(self) -> dict:
        """What moegraft.json says of this layer's carve."""
        out = {
            "router_temperature": self.temperature,
            "calib_hit_rate": round(self.calib_hit_rate, 4),
            "calib_rel_error": round(self.calib_rel_error, 5),
        }
        if self.calib_rel_error_dense_down is not None:
            out["calib_rel_error_dense_down"] = round(self.calib_rel_error_dense_down, 5)
        return out


@lru_cache(maxsize=1)  # one layer's at a time: a convert reads each layer's experts one after another
def read_spilled(path: Path) -> torch.Tensor:
    """The down projection `CarvedLayer.spilled` wrote to `path`."""
    return load_file(path)["down"]


def refits_down(spec: GraftSpec) -> bool:
    """Whether a carve refits its down projections (K = E with equal weights is the dense FFN already)."""
    return spec.carve_fit != "none" and spec.top_k < spec.num_experts


def resolve_carve_spec(spec: GraftSpec, intermediate_size: int) -> GraftSpec:
    """The spec with expert_size = (I - S) / E, once the dense intermediate size I is known.

    Raises:
        SpecError: S >= I, or E does not divide I - S (naming an S and an E that would).
    """
    I, S, E = intermediate_size, spec.shared_size or 0, spec.num_experts
    if S >= I:
        raise SpecError(f"--shared-size {S} >= the dense FFN's {I} neurons; leave neurons for the experts")
    rest = I - S
    if rest % E:
        r = rest % E
        s_ok = [s for s in (S + r, S - (E - r)) if 0 <= s < I]
        e_ok = [e for e in range(max(spec.top_k, 1), 4 * E + 1) if rest % e == 0]
        e_near = sorted(e_ok, key=lambda e: abs(e - E))[:2]
        raise SpecError(
            f"carve: the {rest} non-shared neurons (I {I} - S {S}) do not split into {E} equal experts; "
            f"use --shared-size {' or '.join(map(str, s_ok))}, or --experts {' or '.join(map(str, sorted(e_near)))}"
        )
    return spec.model_copy(update={"expert_size": rest // E})


# ---------------------------------------------------------------------------------------------
# Activations and the balanced clustering


def neuron_activations(X: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Callable) -> torch.Tensor:
    """a = act(X gate^T) · (X up^T): (N, I), the input of down_proj."""
    return act(X @ gate.T) * (X @ up.T)  # (N, I)


def neuron_impact(
    X: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: Callable
) -> torch.Tensor:
    """|a_n|·||down[:, n]|| (N, I): how much neuron n can move the FFN output on each token."""
    return activation_impact(neuron_activations(X, gate, up, act), down)


def activation_impact(a: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """|a_n|·||down[:, n]|| (N, I) from activations a (N, I) and the dense down projection (H, I)."""
    return a.abs() * down.norm(dim=0)


def expert_mass(impact: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Activation mass (N, E) of each expert: Σ over its neurons of |a_n|·||down[:, n]|| (impact (N, I))."""
    return impact[:, experts].sum(-1)  # (N, E, I_e) -> (N, E)


def balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Labels (n,) putting exactly `size` rows in each of the k columns of sim (n, k), most similar pairs first."""
    n, k = sim.shape
    order = np.argsort(-sim.cpu().numpy().ravel(), kind="stable")
    labels = np.full(n, -1, dtype=np.int64)
    count = np.zeros(k, dtype=np.int64)
    left = n
    for flat in order:
        i, c = divmod(int(flat), k)
        if labels[i] < 0 and count[c] < size:
            labels[i] = c
            count[c] += 1
            left -= 1
            if not left:
                break
    return torch.from_numpy(labels)


def balanced_kmeans(
    features: torch.Tensor, k: int, gen: torch.Generator, iters: int = KMEANS_ITERS
) -> torch.Tensor:
    """Spherical k-means with equal cluster sizes on rows of features (n, d), n divisible by k.

    Returns:
        labels (n,), each of 0..k-1 exactly n/k times.
    """
    n = features.shape[0]
    Fn = features / features.norm(dim=1, keepdim=True).clamp_min(1e-8)  # (n, d)
    C = Fn[torch.randperm(n, generator=gen)[:k]].clone()  # (k, d)
    labels = None
    for _ in range(iters):
        new = balanced_assign(Fn @ C.T, n // k).to(Fn.device)  # (n, k) cosine similarities
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        C = F.one_hot(labels, k).T.float() @ Fn  # (k, d): sum of each cluster's rows
        C = C / C.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return labels


# ---------------------------------------------------------------------------------------------
# One layer


def _route_factors(logits: torch.Tensor, top_k: int, renormalise: bool, w0: float) -> torch.Tensor:
    """(N, E) factor each expert's output gets in the carved layer: w_e / w0 if chosen, else 0."""
    p = torch.softmax(logits.float(), dim=-1)  # (N, E)
    top, idx = torch.topk(p, top_k, dim=-1)  # (N, K)
    if renormalise:
        top = top / top.sum(-1, keepdim=True)
    return torch.zeros_like(p).scatter_(-1, idx, top / w0)


def hit_rate(logits: torch.Tensor, mass: torch.Tensor, top_k: int) -> float:
    """Fraction of tokens whose top-K logits (N, E) contain the expert with the most mass (N, E)."""
    best = mass.argmax(-1, keepdim=True)  # (N, 1)
    return float((torch.topk(logits, top_k, dim=-1).indices == best).any(-1).float().mean())


def neuron_factors(factors: torch.Tensor, experts: torch.Tensor, I: int) -> torch.Tensor:
    """(N, I) factor each dense neuron's output gets in the carved layer: its expert's factor (N, E) (w_e / w0 if
    chosen, else 0) for routed neurons (experts (E, I_e) holds their indices), 1 for the shared ones."""
    m = factors.new_ones(len(factors), I)
    E, I_e = experts.shape
    m[:, experts.reshape(-1)] = factors[:, :, None].expand(-1, E, I_e).reshape(len(factors), -1)  # (N, E·I_e)
    return m


def _normal_equations(phi: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi^T phi (I, I), phi^T a (I, I)) in float64: all the down refit needs from the tokens."""
    return (phi.T @ phi).double(), (phi.T @ a).double()


def _solve_down(G: torch.Tensor, PA: torch.Tensor, down: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ||phi W^T - a down^T||^2 + lam ||W - down||^2 with lam = ridge · mean eig(phi^T phi), from the
    normal equations (G, PA) = _normal_equations(phi, a): W (H, I)."""
    lam = ridge * float(G.diagonal().mean())
    D = down.T.double()  # (I, H)
    eye = torch.eye(len(G), dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + lam * eye, PA @ D + lam * D).T.float()


def _rel_error(phi: torch.Tensor, a: torch.Tensor, new_down: torch.Tensor, down: torch.Tensor) -> float:
    target = a @ down.T  # (N, H) the dense FFN
    return float((phi @ new_down.T - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30))


def refit_down(
    a: torch.Tensor, factors: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor | None, float, float]:
    """Least-squares down projection for a carved layer whose routing is fixed.

    The carved FFN is phi(x) W^T with phi = a ⊙ neuron_factors (each neuron's activation times the factor its
    expert gets); the dense FFN is a(x) down^T. Both are linear in the down weights, so the best W on the
    calibration tokens is one ridge-regularised solve (ridge toward the dense columns, chosen on held-out
    tokens). Applying it is exact: W simply replaces down_proj's columns.

    Args:
        a: (N, I) neuron activations on calibration tokens, in block order.
        factors: (N, I) neuron_factors of the layer's router on those tokens.
        down: (H, I) the dense down projection.

    Returns:
        (W (H, I), or None if no ridge beat the dense columns on held-out tokens; held-out relative error of
        the result; held-out relative error with the dense columns).
    """
    phi = a * factors  # (N, I)
    n_fit = int(len(a) * (1 - LSTSQ_HOLDOUT))
    before = _rel_error(phi[n_fit:], a[n_fit:], down, down)
    G_fit, PA_fit = _normal_equations(phi[:n_fit], a[:n_fit])
    errs = [
        _rel_error(phi[n_fit:], a[n_fit:], _solve_down(G_fit, PA_fit, down, r), down) for r in LSTSQ_RIDGES
    ]
    best = int(np.argmin(errs))
    if errs[best] >= before:
        return None, before, before
    G_val, PA_val = _normal_equations(phi[n_fit:], a[n_fit:])
    return _solve_down(G_fit + G_val, PA_fit + PA_val, down, LSTSQ_RIDGES[best]), errs[best], before


@torch.no_grad()
def carve_layer(
    layer: int,
    X: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    act: Callable,
    spec: GraftSpec,
    zero_router_weight: float,
    acts: torch.Tensor | None = None,
) -> CarvedLayer:
    """Carve one dense FFN from its calibration inputs.

    Args:
        layer: layer index (seeds the clustering and the random split).
        X: FFN inputs (N, H) on calibration tokens.
        gate, up: (I, H); down: (H, I) — the dense FFN, fp32.
        act: the FFN's activation (SiLU for the Llama family).
        spec: a carve spec with expert_size resolved (resolve_carve_spec).
        zero_router_weight: w0, the weight of each chosen expert under equal logits.
        acts: (N, I) neuron activations a = neuron_activations(X, ...) if already computed (they do not depend
            on the spec, so several specs share them).

    Returns:
        The CarvedLayer: shared = the S neurons with the largest mean impact |a_n|·||down[:, n]||; experts =
        the rest in E equal groups (balanced k-means on their impact patterns, or a random split); router =
        least squares from X to each expert's share of the token's activation mass, scaled by the
        temperature whose carved output is closest to the dense one.
    """
    E, K, S = spec.num_experts, spec.top_k, spec.shared_size or 0
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + layer)
    if acts is None:
        acts = neuron_activations(X, gate, up, act)  # (N, I)
    impact = activation_impact(acts, down)  # (N, I)
    score = impact.mean(0)  # (I,)
    order = torch.argsort(score, descending=True)
    shared = order[:S].sort().values
    rest = order[S:].sort().values  # (I - S,)
    if spec.split == "random":
        experts = rest[torch.randperm(len(rest), generator=g)].view(E, -1)  # (E, I_e)
    else:
        sub = impact[torch.randperm(len(X), generator=g)[:CLUSTER_TOKENS]][:, rest].T  # (I - S, T')
        # z-score each neuron's pattern: co-activation, not overall magnitude, should decide its group
        sub = (sub - sub.mean(1, keepdim=True)) / sub.std(1, keepdim=True).clamp_min(1e-8)
        labels = balanced_kmeans(sub, E, g)
        experts = torch.stack([rest[labels == e] for e in range(E)])  # (E, I_e)
    experts = experts.sort(dim=1).values

    # router: least squares from x to each expert's share of the token's mass (a per-token distribution)
    mass = expert_mass(impact, experts)  # (N, E)
    share = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    share = share - share.mean(-1, keepdim=True)
    gram = X.T @ X  # (H, H)
    ridge = RIDGE * gram.diagonal().mean()
    W = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], device=gram.device), X.T @ share)  # (H, E)
    logits = X @ W  # (N, E)
    W = W / (logits - logits.mean(-1, keepdim=True)).std().clamp_min(1e-12)  # unit-std logits

    # temperature: the one whose carved output (shared + chosen experts) is closest to the dense FFN
    fit = torch.randperm(len(X), generator=g)[:FIT_TOKENS]
    Xf = X[fit]
    a = neuron_activations(Xf, gate, up, act)  # (N', I)
    y = torch.einsum("nei,hei->neh", a[:, experts], down[:, experts])  # (N', E, H) each expert's output
    dense_out = y.sum(1) + a[:, shared] @ down[:, shared].T  # (N', H)
    z = Xf @ W  # (N', E)
    errs = []
    for t in TEMPERATURES:
        c = _route_factors(t * z, K, spec.norm_topk_prob, zero_router_weight)  # (N', E)
        errs.append(float((((c - 1)[..., None] * y).sum(1)).pow(2).sum()))
    best = int(np.argmin(errs))
    router = (TEMPERATURES[best] * W).T.contiguous()  # (E, H)
    rel_error = errs[best] / max(float(dense_out.pow(2).sum()), 1e-30)
    new_down, rel_before = None, None
    if refits_down(spec):
        c = _route_factors(X @ router.T, K, spec.norm_topk_prob, zero_router_weight)  # (N, E)
        new_down, rel_error, rel_before = refit_down(acts, neuron_factors(c, experts, acts.shape[1]), down)
    return CarvedLayer(
        layer=layer,
        shared=shared,
        experts=experts,
        router=router,
        temperature=TEMPERATURES[best],
        calib_hit_rate=hit_rate(logits, mass, K),
        calib_rel_error=rel_error,
        down=new_down,
        calib_rel_error_dense_down=rel_before,
    )


# ---------------------------------------------------------------------------------------------
# Whole models


def _mlp(model, i: int):
    return model.model.layers[i].mlp


def carved_ffn_output(
    X: torch.Tensor, mlp, carved: CarvedLayer, spec: GraftSpec, zero_router_weight: float
) -> torch.Tensor:
    """(N, H): what the converted layer computes on FFN inputs X (N, H) — shared + routed top-K experts, each
    expert weighted by its factor w_e / w0, with the refitted down projection if there is one."""
    gate, up, down = dense_mlp_weights(mlp)
    a = neuron_activations(X, gate, up, mlp_act(mlp))  # (N, I)
    router = carved.router.to(X.device)  # a carve is kept in host memory (CarvedLayer.cpu)
    c = _route_factors(X @ router.T, spec.top_k, spec.norm_topk_prob, zero_router_weight)  # (N, E)
    m = neuron_factors(c, carved.experts.to(X.device), a.shape[1])  # (N, I)
    refit = carved.down_proj()
    return (a * m) @ (refit.to(X.device) if refit is not None else down).T


@torch.no_grad()
def carve_model(
    model,
    blocks: torch.Tensor,
    specs: list[GraftSpec],
    layers: list[int],
    zero_router_weights: list[float],
    *,
    progress: bool = True,
    weights: LoadedWeights | None = None,
    spill: Path | None = None,
) -> list[dict[int, CarvedLayer]]:
    """Carve the FFNs of `layers` for each spec, from layer-by-layer calibration passes.

    Specs with carve_fit "sequential" get a pass of their own, in which each carved layer replaces the dense
    FFN before the next layer is calibrated (so each layer is fitted to the inputs the converted model will
    give it, as GPTQ does); the other specs share one pass over the dense model.

    Args:
        model: the dense model (LlamaForCausalLM-like), fp32, eval mode.
        blocks: calibration token ids (N, T).
        specs: carve specs with expert_size resolved.
        layers: layer indices to carve.
        zero_router_weights: w0 of each spec's output format.
        weights: a streamed skeleton's (`moegraft.streamed`); None: the model is loaded whole.
        spill: a scratch directory: each refitted down projection (a layer's down_proj, in fp32) waits there
            instead of in memory until the convert writes it (CarvedLayer.spilled).

    Returns:
        For each spec, layer -> CarvedLayer.
    """
    out: list[dict[int, CarvedLayer]] = [{} for _ in specs]
    wanted = set(layers)
    shared_pass = [j for j, s in enumerate(specs) if s.carve_fit != "sequential"]
    passes = ([shared_pass] if shared_pass else []) + [[j] for j in range(len(specs)) if j not in shared_pass]
    for group in passes:
        sequential = specs[group[0]].carve_fit == "sequential"

        def replaced(i: int, X: torch.Tensor, j=group[0]) -> torch.Tensor | None:
            if i not in out[j]:
                return None
            return carved_ffn_output(X, _mlp(model, i), out[j][i], specs[j], zero_router_weights[j])

        for i, X in ffn_inputs_by_layer(
            model, blocks, progress=progress, ffn_out=replaced if sequential else None, weights=weights
        ):
            if i in wanted:
                mlp = _mlp(model, i)
                w = dense_mlp_weights(mlp)
                acts = neuron_activations(X, w[0], w[1], mlp_act(mlp))  # (N, I), shared by the group's specs
                for j in group:
                    c = carve_layer(i, X, *w, mlp_act(mlp), specs[j], zero_router_weights[j], acts).cpu()
                    out[j][i] = c if spill is None else c.spilled(spill)
            if i == max(wanted):
                break
    return out


@torch.no_grad()
def router_hit_rates(
    model, blocks: torch.Tensor, carved: dict[int, CarvedLayer], top_k: int, *, progress: bool = False
) -> dict[int, float]:
    """Per layer, on `blocks` (held-out): fraction of tokens whose router top-K contains the expert with the
    most activation mass in the dense model (chance: K/E)."""
    rates = {}
    for i, X in ffn_inputs_by_layer(model, blocks, progress=progress):
        if i in carved:
            mlp, c = _mlp(model, i), carved[i]
            impact = neuron_impact(X, *dense_mlp_weights(mlp), mlp_act(mlp))  # (N, I)
            rates[i] = hit_rate(
                X @ c.router.to(X.device).T, expert_mass(impact, c.experts.to(X.device)), top_k
            )
        if len(rates) == len(carved):
            break
    return rates


class CarveInit:
    """Carved weights of one layer for an output format (the ExpertInit interface, plus the shared part).

    Args:
        ffn: the layer's dense FFN (read from the source).
        spec: the resolved carve spec.
        carved: where each neuron goes and the router.
        zero_router_weight: w0; expert down_proj is scaled by 1/w0 (see the module docstring).
    """

    dense_scale = 1.0  # the shared part carries its neurons at full weight

    def __init__(self, ffn: DenseFFN, spec: GraftSpec, carved: CarvedLayer, zero_router_weight: float):
        self.ffn, self.spec, self.carved = ffn, spec, carved
        self.down_scale = 1.0 / zero_router_weight
        self.shared_size = len(carved.shared)

    def _down(self) -> torch.Tensor:
        """(H, I): the refitted down projection (carve_fit lstsq), else the dense one."""
        refit = self.carved.down_proj()
        return refit if refit is not None else self.ffn.down()

    def router(self, num_experts: int) -> torch.Tensor:
        """Router weight (E, H)."""
        return self.carved.router.clone()

    @lru_cache(maxsize=1)  # noqa: B019 (one instance per layer; the cache holds one expert)
    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate (I_e, H), up (I_e, H), down (H, I_e)) of expert e: its dense neurons, down scaled by 1/w0."""
        idx = self.carved.experts[e]
        return (
            self.ffn.gate()[idx].clone(),
            self.ffn.up()[idx].clone(),
            self._down()[:, idx] * self.down_scale,
        )

    def shared_part(self, part: int) -> torch.Tensor:
        """Part 0/1/2 (gate (S, H), up (S, H), down (H, S)) of the shared expert, unscaled."""
        idx = self.carved.shared
        if part == 2:
            return self._down()[:, idx].clone()
        return (self.ffn.gate, self.ffn.up)[part]()[idx].clone()


def chance_hit_rate(spec: GraftSpec) -> float:
    """Hit rate of a router that picks K of E experts at random."""
    return spec.top_k / spec.num_experts


__all__ = [
    "CarveInit",
    "CarvedLayer",
    "balanced_kmeans",
    "carve_layer",
    "carve_model",
    "chance_hit_rate",
    "resolve_carve_spec",
    "router_hit_rates",
]
