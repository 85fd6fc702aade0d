"""A plan's report: a dense model's costs beside the MoE's, as JSON or as rich tables.

In: two `ModelCost`s (plan.cost) and the notes. Out: `PlanReport` (`to_json`, `headline`, `render`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table

from moegraft.plan.cost import BITS, GIB, ModelCost


def _fmt_params(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    for div, unit in ((GIB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_flops(n: float) -> str:
    for div, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "KFLOP")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} FLOP"


class PlanReport(BaseModel):
    """A dense model's costs and, with a spec, those of the MoE it would become."""

    model_config = ConfigDict(frozen=True)

    dense: ModelCost
    moe: ModelCost | None
    context: int
    batch: int
    gpu_memory_gb: float | None
    spec: dict | None
    format: str | None
    notes: list[str]

    @property
    def ratios(self) -> dict[str, float] | None:
        """MoE / dense for total, active, FLOPs and memory: memory follows total, compute follows active."""
        if self.moe is None:
            return None
        d, m = self.dense, self.moe
        return {
            "total_params": m.total_params / d.total_params,
            "active_params": m.active_params / d.active_params,
            "active_params_non_embedding": m.active_params_non_embedding / d.active_params_non_embedding,
            "flops_per_token": m.flops_per_token / d.flops_per_token,
            "weight_bytes": m.weight_bytes["bf16"] / d.weight_bytes["bf16"],
            "kv_cache_bytes": m.kv_cache_bytes / d.kv_cache_bytes if d.kv_cache_bytes else 1.0,
        }

    def to_json(self) -> dict:
        """Plain dict for `--json`: both costs, the ratios and the notes."""
        out = self.model_dump(mode="json")
        out["ratios"] = self.ratios
        return out

    def headline(self) -> str:
        """One line that says where memory and compute go."""
        d, m = self.dense, self.moe
        if m is None:
            return (
                f"{d.architecture}: {_fmt_params(d.total_params)} total (memory), "
                f"{_fmt_params(d.active_params)} active per token (compute)"
            )
        r = self.ratios or {}
        return (
            f"Memory follows total: {_fmt_params(d.total_params)} -> {_fmt_params(m.total_params)} "
            f"(x{r['total_params']:.2f}). Compute follows active: {_fmt_params(d.active_params)} -> "
            f"{_fmt_params(m.active_params)} (x{r['active_params']:.2f}), FLOPs/token x{r['flops_per_token']:.2f}."
        )

    def render(self, console: Console) -> None:
        """Print the costs side by side (with MoE/dense ratios), then the headline and the notes."""
        models = [self.dense] if self.moe is None else [self.dense, self.moe]
        table = Table(
            title=f"moegraft plan — context {self.context}, batch {self.batch}", title_justify="left"
        )
        table.add_column("")
        table.add_column(
            f"{'dense' if self.dense.moe_layers == 0 else 'model'}\n{self.dense.architecture}",
            justify="right",
        )
        if self.moe is not None:
            table.add_column(f"MoE\n{self.moe.architecture}", justify="right")
            table.add_column("MoE / dense", justify="right")

        def row(label: str, cell, value=None) -> None:
            """One line: `cell` formats each model; `value` (a number) gives the MoE/dense ratio."""
            cells = [cell(c) for c in models]
            if self.moe is not None:
                a = value(self.dense) if value else 0
                cells.append(f"x{value(self.moe) / a:.2f}" if a else "")
            table.add_row(label, *cells)

        def counted(get, fmt):
            return lambda c: fmt(get(c)), get

        def layers(c: ModelCost) -> str:
            if not c.moe_layers:
                return f"{c.num_layers} (dense)"
            return f"{c.num_layers} ({c.moe_layers} MoE: E={c.num_experts} K={c.top_k} I_e={c.expert_size})"

        row("layers", layers)
        row("total params  (memory)", *counted(lambda c: c.total_params, _fmt_params))
        row("active params / token  (compute)", *counted(lambda c: c.active_params, _fmt_params))
        row("  active, non-embedding", *counted(lambda c: c.active_params_non_embedding, _fmt_params))
        row("FLOPs / token", *counted(lambda c: c.flops_per_token, _fmt_flops))
        row("  matmul (2 x active weights)", *counted(lambda c: c.matmul_flops_per_token, _fmt_flops))
        row(f"  attention @ {self.context} keys", *counted(lambda c: c.attention_flops_per_token, _fmt_flops))
        for d in BITS:
            row(f"weights {d}", *counted(lambda c, d=d: c.weight_bytes[d], _fmt_bytes))
        row(
            f"KV cache bf16 ({self.context} x {self.batch})", *counted(lambda c: c.kv_cache_bytes, _fmt_bytes)
        )
        if self.gpu_memory_gb is not None:
            for d in BITS:
                row(
                    f"fits {self.gpu_memory_gb:g} GiB @ {d}",
                    lambda c, d=d: (
                        ("yes" if c.fits and c.fits[d] else "NO")
                        + f" ({_fmt_bytes(c.weight_bytes[d] + c.kv_cache_bytes)})"
                    ),
                )
        console.print(table)
        console.print(self.headline())
        for note in self.notes:
            console.print(f"- {note}", highlight=False)
