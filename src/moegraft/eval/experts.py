"""Which transformers `experts_implementation` runs a MoE model, and switching it.

In: a loaded transformers MoE model. Out: the implementations it can use (moegraft's own first), a switch.
"""

from __future__ import annotations

from torch import nn

from moegraft.errors import MoegraftError
from moegraft.models import DEFAULT_EXPERTS_IMPL as DEFAULT_EXPERTS_IMPL  # re-exported
from moegraft.routing import router_modules

# moegraft's own (moegraft.experts_impl, registered with transformers) and transformers' CPU-capable ones
# (integrations/moe.py). The same list serves CUDA: there "moegraft" defers to grouped_mm, and "deepgemm" /
# "sonicmoe" need CUDA kernels that moegraft does not install.
CPU_EXPERTS_IMPLS = (DEFAULT_EXPERTS_IMPL, "eager", "grouped_mm", "batched_mm")
# Measured before moegraft had its own (benchmarks/bench_eval.py, 2 shared CPU cores, fp32, SmolLM2-135M →
# Qwen2-MoE 8 × 256 top-2, forward 8 × 256, time ÷ dense time): grouped_mm 1.51, eager 2.08, batched_mm 18.0
# (it gathers one copy of the expert weights per token: 7 GB peak). The default lives in moegraft.models, which
# pins it on every MoE it loads; benchmarks/bench_experts.py measures all of them side by side.


def is_moe(model: nn.Module) -> bool:
    return bool(router_modules(model))


def experts_impls(model: nn.Module) -> tuple[str, ...]:
    """Implementations worth trying for this model (empty for a dense model)."""
    if not is_moe(model) or not hasattr(model, "set_experts_implementation"):
        return ()
    return CPU_EXPERTS_IMPLS


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
