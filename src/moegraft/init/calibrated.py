"""A graft calibrated on text: per MoE layer, a data-set router and experts that start from dense neurons.

In: the loaded dense model, calibration token blocks (N, T), the spec and the output format. Out: layer ->
LayerCalibration, which ExpertInit turns into the format's router weight and expert tensors. The experts'
output path stays zero, so the grafted model still computes the dense function exactly.

Experts from dense neurons (`--init neurons`): expert e copies the gate/up rows of the I_e dense neurons whose
activation mass |a_n|·||down[:, n]|| on the calibration tokens routed to e most exceeds their mean over all
tokens. Random inputs (`--init zero`) give tiny activations whose output weights learn slowly; copied neurons
fire at the dense model's own scale on exactly the tokens the expert will see, so its down_proj gets large,
specific gradients from the first step (and the router gets a gradient as soon as down_proj moves).
"""

from __future__ import annotations

import torch

from moegraft.calibrate import (
    LAYERWISE_TYPES,
    LoadedWeights,
    decoder_layers,
    dense_mlp_weights,
    ffn_inputs_by_layer,
    mlp_act,
    mlp_inputs_by_layer,
    residuals_by_layer,
)
from moegraft.config import GraftSpec
from moegraft.init.carve import neuron_impact
from moegraft.init.experts import LayerCalibration, random_router_weight
from moegraft.init.router import fit_router


def select_neurons(impact: torch.Tensor, chosen: torch.Tensor, num_experts: int, size: int) -> torch.Tensor:
    """(E, I_e) dense neurons per expert: the `size` whose mean impact on the expert's tokens most exceeds
    their mean impact on all tokens.

    Args:
        impact: (N, I) |a_n|·||down[:, n]|| per calibration token.
        chosen: (N, K) experts each token is routed to.
    """
    base = impact.mean(0)  # (I,)
    rows = []
    for e in range(num_experts):
        mine = (chosen == e).any(-1)  # (N,)
        excess = (impact[mine].mean(0) if mine.any() else base) - base  # (I,)
        rows.append(torch.topk(excess, size).indices.sort().values)
    return torch.stack(rows)  # (E, I_e)


def _gemma4_router_input(R: torch.Tensor, eps: float) -> torch.Tensor:
    """What Gemma4TextRouter's proj multiplies at init (scale = 1): rmsnorm without weight, times H^-0.5."""
    H = R.shape[-1]
    return R * torch.rsqrt(R.pow(2).mean(-1, keepdim=True) + eps) * H**-0.5


def _inputs_by_layer(
    model,
    blocks: torch.Tensor,
    layers: list[int],
    router_reads_residual: bool,
    progress: bool,
    weights: LoadedWeights | None,
):
    """Yield (layer, router inputs (N, H), FFN inputs (N, H)) for each of `layers`, in order; `weights` is
    ffn_inputs_by_layer's (the Llama family only: the others run the whole loaded model)."""
    if router_reads_residual:  # Gemma 4: the router reads the residual stream, normalised its own way
        mods = decoder_layers(model)
        eps = model.config.get_text_config().rms_norm_eps
        for i, R in residuals_by_layer(model, blocks, layers, progress=progress):
            with torch.no_grad():
                ln = mods[i].pre_feedforward_layernorm
                dtype = ln.weight.dtype
                X = ln.float()(R)  # (N, H) the dense MLP's input
                ln.to(dtype)
            yield i, _gemma4_router_input(R, eps), X
        return
    if model.config.model_type not in LAYERWISE_TYPES:
        for i, X in mlp_inputs_by_layer(model, blocks, layers, progress=progress):
            yield i, X, X  # the router reads the FFN's own input (Qwen3.5 MoE)
        return
    wanted = set(layers)
    for i, X in ffn_inputs_by_layer(model, blocks, progress=progress, weights=weights):
        if i in wanted:
            yield i, X, X  # Qwen2-MoE and GLM route the FFN's own input
        if i >= max(wanted):
            return


@torch.no_grad()
def calibrate_graft(
    model,
    blocks: torch.Tensor,
    spec: GraftSpec,
    layers: list[int],
    *,
    router_init: str,
    score: str,
    router_reads_residual: bool = False,
    progress: bool = True,
    weights: LoadedWeights | None = None,
) -> dict[int, LayerCalibration]:
    """Fit each MoE layer's router (router_init 'kmeans') and pick each expert's neurons (init 'neurons').

    Args:
        model: the dense model, eval mode (any dtype; layers run in fp32).
        blocks: calibration token ids (N, T).
        spec: the graft spec (E, K, I_e <= the dense I, init, seed, router_entropy).
        layers: MoE layer indices.
        router_init: 'kmeans' (fit it) or 'random' (the random router; neurons still follow its routing).
        score: the format's routing score, 'softmax' or 'sigmoid'.
        router_reads_residual: the format's router reads the residual stream, not the FFN input (Gemma 4).
        weights: a streamed skeleton's (`moegraft.streamed`), for the Llama family; None: the model is loaded.
    """
    E, K = spec.num_experts, spec.top_k
    out: dict[int, LayerCalibration] = {}
    mods = decoder_layers(model)
    for i, Xr, Xf in _inputs_by_layer(model, blocks, layers, router_reads_residual, progress, weights):
        stats: dict = {}
        if router_init == "kmeans":
            fitted = fit_router(
                i,
                Xr,
                E,
                K,
                block_len=blocks.shape[1],
                entropy=spec.router_entropy,
                score=score,
                seed=spec.seed,
            )
            W, stats = fitted.weight, fitted.stats()
        else:
            W = random_router_weight(spec, i, E, Xr.shape[1]).to(Xr.device)
        neurons = None
        if spec.init == "neurons":
            mlp = mods[i].mlp
            impact = neuron_impact(Xf, *dense_mlp_weights(mlp), mlp_act(mlp))  # (N, I)
            chosen = torch.topk(Xr @ W.T, K, dim=-1).indices  # (N, K)
            neurons = select_neurons(impact, chosen, E, spec.expert_size)
        # kept in host memory: calibration may run on a GPU, the writer reads them on the CPU
        out[i] = LayerCalibration(i, W.cpu().contiguous(), None if neurons is None else neurons.cpu(), stats)
    return out
