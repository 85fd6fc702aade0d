"""Which transformers `experts_implementation` runs a MoE model, and which one is fastest here.

In: a loaded transformers MoE model. Out: the implementations it can use, a switch, and a timed choice.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from moegraft.errors import MoegraftError
from moegraft.models import DEFAULT_EXPERTS_IMPL as DEFAULT_EXPERTS_IMPL  # re-exported
from moegraft.routing import router_modules

# transformers' CPU-capable implementations (integrations/moe.py); "deepgemm"/"sonicmoe" need CUDA kernels.
CPU_EXPERTS_IMPLS = ("eager", "grouped_mm", "batched_mm")
CUDA_EXPERTS_IMPLS = CPU_EXPERTS_IMPLS
# Measured (benchmarks/bench_eval.py, 2 shared CPU cores, fp32, SmolLM2-135M → Qwen2-MoE 8 × 256 top-2,
# forward 8 × 256, time ÷ dense time): grouped_mm 1.51, eager 2.08, batched_mm 18.0 (it gathers one copy of
# the expert weights per token: 7 GB peak). grouped_mm is also transformers' own default; the constant lives in
# moegraft.models, which pins it on every MoE it loads.


def is_moe(model: nn.Module) -> bool:
    return bool(router_modules(model))


def experts_impls(model: nn.Module) -> tuple[str, ...]:
    """Implementations worth trying for this model on its device (empty for a dense model)."""
    if not is_moe(model) or not hasattr(model, "set_experts_implementation"):
        return ()
    return CUDA_EXPERTS_IMPLS if next(model.parameters()).device.type == "cuda" else CPU_EXPERTS_IMPLS


def current_experts_impl(model: nn.Module) -> str | None:
    return getattr(model.config, "_experts_implementation", None) if is_moe(model) else None


def set_experts_impl(model: nn.Module, impl: str) -> None:
    """Switch the experts forward of every MoE layer (a no-op for a dense model)."""
    if not is_moe(model):
        return
    try:
        model.set_experts_implementation(impl)
    except (ValueError, ImportError, RuntimeError) as e:
        raise MoegraftError(
            f"experts implementation {impl!r} is not usable here ({str(e).splitlines()[0]})"
        ) from None


@torch.no_grad()
def fastest_experts_impl(
    model: nn.Module,
    *,
    batch: int = 8,
    seq_len: int = 256,
    reps: int = 3,
    impls: tuple[str, ...] | None = None,
) -> str | None:
    """Time one forward of a (batch, seq_len) random block per implementation; set and return the fastest.

    Args:
        model: a loaded MoE model (a dense model returns None untouched).
        batch, seq_len: the block shape; prefill-shaped work is what eval and train run.
        reps: timed repetitions after one warm-up; the median counts.
        impls: candidates (default: every implementation usable on the model's device).

    Returns:
        The fastest implementation, now set on the model.
    """
    impls = impls or experts_impls(model)
    if not impls:
        return None
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, seq_len), generator=g).to(
        device
    )
    times: dict[str, list[float]] = {i: [] for i in impls}
    for i in impls:  # warm-up
        set_experts_impl(model, i)
        model(ids, use_cache=False)
    for _ in range(reps):  # alternate, so that drift in machine load hits every implementation alike
        for i in impls:
            set_experts_impl(model, i)
            t0 = time.perf_counter()
            model(ids, use_cache=False)
            times[i].append(time.perf_counter() - t0)
    best = min(impls, key=lambda i: sorted(times[i])[len(times[i]) // 2])
    set_experts_impl(model, best)
    return best
