"""An eval report people can read: a directory with report.md, report.json and PNG plots.

In: an EvalResult. Out: DIR/report.md, DIR/report.json, DIR/perplexity.png and, for a MoE,
DIR/expert_load.png (layers × experts heatmap, H / ln E per row) and DIR/imbalance.png (CV and MaxVio
per layer).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moegraft.eval.metrics import LMMetrics  # noqa: E402
from moegraft.eval.result import EvalResult  # noqa: E402
from moegraft.eval.routing_report import LayerRouting, routing_summary  # noqa: E402
from moegraft.io.atomic import atomic_output_dir  # noqa: E402

# Balanced enough (DESIGN.md): worst layer's load CV ≤ 0.5, no expert below 10% of its fair share.
CV_TARGET = 0.5


def _short(name: str, n: int = 40) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1) :]


def plot_expert_load(routing: list[LayerRouting], path: Path) -> Path:
    """Heatmap of load relative to the fair share (1 = balanced, 0 = dead), one row per MoE layer."""
    load = np.array([np.array(r.fractions) * r.num_experts for r in routing])  # (L, E)
    L, E = load.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * E + 3), max(3.5, 0.32 * L + 2)))
    vmax = max(2.0, float(load.max()))
    im = ax.imshow(load, aspect="auto", cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label("load / fair share  (1 = balanced, 0 = dead)")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer, H = entropy / ln E")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L))
    # entropy beside each row: an even row is only good news if the router still prefers (H well below 1)
    ax.set_yticklabels([f"L{r.layer} H={r.entropy_norm:.2f}" for r in routing])
    if L > 40:  # keep labels readable on deep models
        for i, lab in enumerate(ax.get_yticklabels()):
            lab.set_visible(i % 2 == 0)
    if L * E <= 400:
        for i in range(L):
            for j in range(E):
                v = load[i, j]
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if v > 0.6 * vmax else "white",
                )
    ax.set_title(f"Expert load per MoE layer (top-{routing[0].top_k} of {E}); H = 1: uniform router")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_imbalance(routing: list[LayerRouting], path: Path) -> Path:
    """Two panels over layers: load CV (with the 0.5 target) and MaxVio; dead experts marked."""
    layers = [r.layer for r in routing]
    x = np.arange(len(layers))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(layers) + 3), 6), sharex=True)
    ax1.bar(x, [r.cv for r in routing], color="tab:blue")
    ax1.axhline(CV_TARGET, color="tab:red", ls="--", lw=1, label=f"target CV ≤ {CV_TARGET}")
    ax1.set_ylim(0, max(CV_TARGET, *(r.cv for r in routing)) * 1.25)  # keep the target line off the frame
    ax1.set_ylabel("load CV (std / mean)")
    ax1.set_title("Load imbalance per MoE layer")
    ax1.legend(loc="upper right", fontsize=8)
    ax2.bar(x, [r.max_vio for r in routing], color="tab:orange")
    ax2.set_ylabel("MaxVio (max / mean − 1)")
    ax2.set_xlabel("layer")
    for xi, r in zip(x, routing, strict=True):
        if r.dead:
            ax2.annotate(f"{r.dead} dead", (xi, r.max_vio), ha="center", va="bottom", fontsize=7, rotation=90)
    ax2.set_xticks(x)
    ax2.set_xticklabels([str(lay) for lay in layers], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_perplexity(result: EvalResult, path: Path) -> Path:
    """Bars: perplexity of the model and of the baseline on the same blocks, values written on the bars."""
    m = result.metrics
    names, values, colors = ["model"], [m.perplexity], ["tab:blue"]
    if m.baseline_perplexity is not None:
        names.insert(0, "baseline (dense)")
        values.insert(0, m.baseline_perplexity)
        colors.insert(0, "tab:gray")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    bars = ax.bar(names, values, color=colors, width=0.5)
    for b, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=10)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_ylim(0, max(values) * 1.15)
    title = f"Perplexity on {_short(result.data, 30)}\n{m.tokens} predicted tokens"
    if m.kl is not None:
        title += f", KL(base ‖ model) = {m.kl:.3g}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(v: float | None, f: str = "{:.4f}") -> str:
    return "—" if v is None else f.format(v)


def _quality(m: LMMetrics) -> list[str]:
    """Markdown lines: perplexity and NLL of model and baseline, then KL and top-1 agreement when compared."""
    out = ["| | model | baseline |", "|---|---|---|"]
    out += [f"| perplexity | {_fmt(m.perplexity)} | {_fmt(m.baseline_perplexity)} |"]
    out += [f"| NLL (nats/token) | {_fmt(m.nll)} | {_fmt(m.baseline_nll)} |"]
    if m.kl is not None:
        out += [
            "",
            f"- KL(baseline ‖ model): **{m.kl:.3g}** nats/token",
            f"- top-1 agreement: **{m.top1_agreement:.2%}**",
        ]
    return out


def _markdown(result: EvalResult, plots: dict[str, str]) -> str:
    m = result.metrics
    out = [f"# moegraft eval: {result.model}", ""]
    out += [
        f"- data: `{result.data}`, {result.blocks} blocks × {result.seq_len} tokens ({m.tokens} predicted)"
    ]
    if result.baseline:
        out += [f"- baseline: `{result.baseline}`"]
    if result.experts_impl:
        out += [f"- experts implementation: `{result.experts_impl}`"]
    out += [f"- time: {result.seconds:.1f} s", "", "## Quality", ""]
    out += _quality(m)
    if result.retain is not None:  # the second dataset: what training may have made the model forget
        r = result.retain
        out += ["", f"### Retention: `{result.retain_data}` ({r.tokens} predicted tokens)", ""]
        out += _quality(r)
    out += ["", f"![perplexity]({plots['perplexity']})", ""]
    if result.routing:
        out += ["## Router health", ""]
        out += [
            "Load = share of (token, slot) assignments; fair share is 1/E. CV = std/mean of expert counts; "
            "MaxVio = max/mean − 1; entropy of the router distribution in nats (uniform = ln E); "
            "H/ln E = that entropy normalised (1 = uniform router, 0 = one-hot): low CV with H/ln E near 1 "
            "means balanced by not choosing. Min share = least-used expert's load / fair share (0 = dead).",
            "",
        ]
        out += [
            "| layer | CV | MaxVio | dead | < 10% fair | min share | entropy | H/ln E | mean top-k weight "
            "| min load | max load |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result.routing:
            out += [
                f"| {r.layer} | {r.cv:.3f} | {r.max_vio:.3f} | {r.dead} | {r.under_10pct} | "
                f"{r.min_share:.3f} | {r.entropy:.3f} | {r.entropy_norm:.3f} | {r.mean_topk_weight:.3f} | "
                f"{min(r.fractions):.3f} | {max(r.fractions):.3f} |"
            ]
        s = routing_summary(result.routing)
        ok = s["worst_cv"] <= CV_TARGET and all(r.under_10pct == 0 for r in result.routing)
        out += [
            "",
            f"Worst layer: {s['worst_cv_layer']} (CV {s['worst_cv']:.2f}). "
            f"{'Balanced' if ok else 'Not balanced'} by the target (worst CV ≤ {CV_TARGET}, "
            "no expert below 10% of its fair share).",
            "",
            f"Mean H/ln E: {s['mean_entropy_norm']:.2f} (1 = uniform router). "
            f"Worst min share: {s['worst_min_share']:.2f} (layer {s['worst_min_share_layer']}).",
            "",
        ]
        out += [f"![expert load]({plots['expert_load']})", "", f"![imbalance]({plots['imbalance']})", ""]
    if result.lm_eval:
        out += ["## lm-eval", "", "| who | task | metric | value |", "|---|---|---|---|"]
        for who, tasks in result.lm_eval.items():
            for task, scores in tasks.items():
                out += [f"| {who} | {task} | {k} | {v:.4f} |" for k, v in scores.items()]
        out += [""]
    for n in result.notes:
        out += [f"- {n}"]
    return "\n".join(out) + "\n"


def write_report(result: EvalResult, report_dir: str | Path) -> Path:
    """Write report.md, report.json and the PNGs into `report_dir` (created if missing); return it."""
    out = Path(report_dir)
    # written beside DIR, then moved in: each file appears whole, report.md (which links the rest) last, and
    # other files already in DIR stay
    with atomic_output_dir(out, overwrite=True, merge=True) as d:
        plots = {"perplexity": plot_perplexity(result, d / "perplexity.png").name}
        if result.routing:
            plots["expert_load"] = plot_expert_load(result.routing, d / "expert_load.png").name
            plots["imbalance"] = plot_imbalance(result.routing, d / "imbalance.png").name
        doc = {**result.to_json(), "plots": plots}
        if result.routing:
            doc["routing_summary"] = routing_summary(result.routing)
        (d / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
        (d / "report.md").write_text(_markdown(result, plots))
    return out
