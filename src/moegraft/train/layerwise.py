"""Layer-wise distillation: each carved FFN fitted to the dense FFN's output, on the inputs the carved model gives it.

In: the student (a carved MoE whose FFN parameters that should train have requires_grad), the dense teacher (same
attention, embeddings and norms: a carve changes only the FFNs), token blocks. Out: the student's FFNs trained
in place, layer after layer, and each layer's held-out relative error before and after.

Why before end-to-end KL: the KL gives one scalar per token through every layer at once, while here every layer
gets an H-dimensional target per token (the dense FFN's output), so each FFN converges in a few hundred cheap
steps without the LM head or the other layers in the graph (block reconstruction, as GPTQ and CMoE fit layers).
Layer l is fitted on the inputs that the already-fitted layers < l give it (`ffn_inputs_by_layer`'s ffn_out),
so the errors of earlier layers are part of what later ones learn to undo.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from moegraft.calibrate import ffn_inputs_by_layer
from moegraft.progress import Progress
from moegraft.train.schedule import cosine_lr

# tokens per optimizer step: at most CHUNK (on SmolLM2-135M, 256 converged no better per token than 1024 and took
# twice the time per token), but small enough for MIN_STEPS steps per epoch (60 steps of 1024 on a small set did
# not move a layer that 232 steps of 256 fitted)
CHUNK = 1024
MIN_STEPS = 32
HOLDOUT = 0.1  # share of the tokens (whole blocks, the last ones) that only measure the error
EVAL_CHUNK = 4096  # tokens per forward when measuring (no graph)


@dataclass(frozen=True)
class LayerFit:
    """One layer's held-out ||carved FFN - dense FFN||^2 / ||dense FFN||^2, before and after its fit."""

    layer: int
    rel_error_before: float
    rel_error_after: float
    steps: int
    kept: bool  # False: the fit did not lower the held-out error, and the layer kept its weights

    def record(self) -> dict:
        return asdict(self)


def _apply(mlp: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """mlp on token rows X (n, H) -> (n, H); transformers' FFN blocks take (B, T, H)."""
    return mlp(X[None]).reshape(X.shape)


@torch.no_grad()
def _outputs(mlp: nn.Module, X: torch.Tensor) -> torch.Tensor:
    dtype = next(mlp.parameters()).dtype
    return torch.cat([_apply(mlp, x.to(dtype)).float() for x in X.split(EVAL_CHUNK)])


def _rel_error(mlp: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> float:
    return float((_outputs(mlp, X) - Y).pow(2).sum() / Y.pow(2).sum().clamp_min(1e-30))


def fit_layer(
    mlp: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, epochs: int, lr: float, gen: torch.Generator
) -> tuple[float, float, int, bool]:
    """Fit `mlp`'s trainable parameters so that mlp(X) ≈ Y, minimising the mean squared error over tokens with
    AdamW and a cosine schedule; the last HOLDOUT of the rows only measures.

    Args:
        mlp: the student's FFN block, in place.
        X: (N, H) its inputs; Y: (N, H) the dense FFN's outputs on them, fp32.

    Returns:
        (held-out relative error before, after, optimizer steps, whether the fitted weights were kept: they are
        not if they did no better than the start).
    """
    params = [p for p in mlp.parameters() if p.requires_grad]
    n_fit = int(len(X) * (1 - HOLDOUT))
    Xf, Yf, Xh, Yh = X[:n_fit], Y[:n_fit], X[n_fit:], Y[n_fit:]
    before = _rel_error(mlp, Xh, Yh)
    if not params or not epochs or n_fit < 1:
        return before, before, 0, False
    start = [p.detach().clone() for p in params]
    scale = 1.0 / Yf.pow(2).sum(-1).mean().clamp_min(1e-30)  # the loss is a relative error: lr fits any layer
    chunk = max(1, min(CHUNK, n_fit // MIN_STEPS))
    steps_per_epoch = math.ceil(n_fit / chunk)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lr(total, 0, 0.1))
    dtype = params[0].dtype
    mlp.train()
    for _ in range(epochs):
        for idx in torch.randperm(n_fit, generator=gen).split(chunk):
            out = _apply(mlp, Xf[idx].to(dtype)).float()  # (chunk, H)
            loss = (out - Yf[idx]).pow(2).sum(-1).mean() * scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
    mlp.eval()
    after = _rel_error(mlp, Xh, Yh)
    if after >= before:  # never hand the next layers a worse FFN than the carve's own
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        return before, before, total, False
    return before, after, total, True


def distill_layers(
    student: nn.Module,
    teacher: nn.Module,
    blocks: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int = 0,
    progress: bool = True,
) -> list[LayerFit]:
    """Fit every student FFN to the teacher's FFN of the same layer, first layer first (module docstring).

    Args:
        student: the carved MoE model (`model.model.layers[i].mlp`), on the device it should train on.
        teacher: the dense model it was carved from, on the same device.
        blocks: token ids (N, T); the last HOLDOUT of them measure each layer's error.
        epochs: passes over the fitting tokens per layer.
        lr: peak AdamW learning rate.

    Returns:
        One LayerFit per layer.
    """
    gen = torch.Generator().manual_seed(seed)
    t_layers = teacher.model.layers
    fits: list[LayerFit] = []
    was_training = student.training
    student.eval()

    def fitted_output(i: int, X: torch.Tensor) -> torch.Tensor:
        return _outputs(student.model.layers[i].mlp, X)

    with Progress(len(t_layers), "distil (layers)", enabled=progress) as bar:
        for i, X in ffn_inputs_by_layer(student, blocks, progress=False, ffn_out=fitted_output):
            Y = _outputs(t_layers[i].mlp, X)  # (N·T, H) the dense FFN on the carved model's inputs
            before, after, steps, kept = fit_layer(
                student.model.layers[i].mlp, X, Y, epochs=epochs, lr=lr, gen=gen
            )
            fits.append(LayerFit(i, before, after, steps, kept))
            bar.advance(1)
    student.train(was_training)
    return fits


__all__ = ["LayerFit", "distill_layers", "fit_layer"]
