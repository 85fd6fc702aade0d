"""The equal-budget comparison's result and how it is shown: data (Row, CompareResult) and its renderings.

In: a CompareResult (from `moegraft.compare.compare`). Out: the rich table with the winners and notes, compare.md,
compare.png (Δ perplexity bars) and compare.json, written by `write_comparison`; beside them, what the budget sweep
measured (SWEEP_FILE, shipped with the package), so a user knows what to expect at other budgets.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

COMPARE_FILE = "compare.json"
ROWS = ("dense", "graft", "lora")
# The budget sweep's summary (benchmarks/bench_crossover.py writes it): one place for what it measured
SWEEP_FILE = Path(__file__).with_name("crossover.json")
WIDTH = 80  # the sweep's lines fit a terminal of this width


@dataclass(frozen=True)
class Row:
    """One model of the comparison; Δ% = 100 · (ppl / dense ppl − 1), so negative is better than dense."""

    name: str  # "dense", "graft", "LoRA r=N"
    domain_ppl: float
    domain_delta_pct: float
    retain_ppl: float
    retain_delta_pct: float
    trainable_params: int  # 0 for the dense model
    train_seconds: float | None  # the training loop alone; None for the dense model
    active_params: int  # per token (plan's convention: embedding table counted once)
    flops_per_token: int  # at context seq_len (plan's accounting)
    flops_ratio: float  # vs dense
    domain_kl: float | None = None  # KL(dense ‖ model) per token, nats
    domain_top1: float | None = None  # top-1 agreement with dense
    retain_kl: float | None = None
    retain_top1: float | None = None


@dataclass(frozen=True)
class CompareResult:
    """dense, graft and LoRA rows, and what makes the comparison fair (same blocks, budget, trainable size)."""

    dense: str
    moe_dir: str
    out: Path
    rows: tuple[Row, Row, Row]  # dense, graft, LoRA
    lora_rank: int
    lora_params_per_rank: int  # Σ (in + out) over the adapted linears: LoRA params = rank × this
    lora_lr: float
    steps: int
    tokens: int
    seq_len: int
    domain: str  # what the domain blocks are
    domain_blocks: int
    retain: str
    retain_blocks: int
    train_blocks_sha256: str
    spec: dict  # the graft's TrainSpec (the LoRA's differs only in lr and the balance terms)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["out"] = str(self.out)
        doc["rows"] = {key: asdict(r) for key, r in zip(ROWS, self.rows, strict=True)}
        doc["winners"] = self.winners()
        return doc

    def winners(self) -> dict[str, str]:
        """Axis → "graft", "LoRA" or "tie": the better of the two trained models on each axis (lower wins)."""
        _, g, lo = self.rows

        def better(a: float | None, b: float | None) -> str:
            if a is None or b is None or math.isclose(a, b, rel_tol=1e-9):
                return "tie"
            return "graft" if a < b else "LoRA"

        return {
            "domain perplexity": better(g.domain_ppl, lo.domain_ppl),
            "retention perplexity": better(g.retain_ppl, lo.retain_ppl),
            "train time": better(g.train_seconds, lo.train_seconds),
            "inference FLOPs/token": better(g.flops_per_token, lo.flops_per_token),
        }

    def render(self, console: Console) -> None:
        """Print the table, the winners and the notes (`render_comparison`; kept for the CLI's call)."""
        render_comparison(self, console)


def score_row(name: str, ev, dense_ev, trainable: int, seconds: float | None, cost, dense_cost) -> Row:
    """A Row from an EvalResult (domain metrics + .retain) against the dense model's EvalResult."""
    m, r = ev.metrics, ev.retain
    dm, dr = dense_ev.metrics, dense_ev.retain
    return Row(
        name=name,
        domain_ppl=m.perplexity,
        domain_delta_pct=100 * (m.perplexity / dm.perplexity - 1),
        retain_ppl=r.perplexity,
        retain_delta_pct=100 * (r.perplexity / dr.perplexity - 1),
        trainable_params=trainable,
        train_seconds=seconds,
        active_params=cost.active_params,
        flops_per_token=cost.flops_per_token,
        flops_ratio=cost.flops_per_token / dense_cost.flops_per_token,
        domain_kl=m.kl,
        domain_top1=m.top1_agreement,
        retain_kl=r.kl,
        retain_top1=r.top1_agreement,
    )


HEAD = (
    "",
    "domain ppl",
    "Δ vs dense",
    "retention ppl",
    "Δ vs dense",
    "trainable params",
    "train s",
    "active params/token",
    "FLOPs/token vs dense",
)


def winner_line(result: CompareResult) -> str:
    return "Won — " + "; ".join(f"{axis}: {who}" for axis, who in result.winners().items())


def cells(r: Row) -> list[str]:
    """One row of the table, as text."""

    def delta(v: float, dense: bool) -> str:
        return "—" if dense else f"{v:+.2f}%"

    dense = r.name == "dense"
    return [
        r.name,
        f"{r.domain_ppl:.4f}",
        delta(r.domain_delta_pct, dense),
        f"{r.retain_ppl:.4f}",
        delta(r.retain_delta_pct, dense),
        "—" if dense else f"{r.trainable_params:,}",
        "—" if r.train_seconds is None else f"{r.train_seconds:.1f}",
        f"{r.active_params:,}",
        f"x{r.flops_ratio:.3f}",
    ]


def budget_label(tokens: int) -> str:
    """10240 → "10k", 163840 → "160k" (the sweep's budgets are multiples of 1024)."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else f"{tokens:,}"


def _axis(key: str, budgets: list[dict]) -> str:
    """Who was ahead on one axis (a Δ% key; lower wins) across the sorted budgets, in a few words."""
    labels = [budget_label(b["tokens"]) for b in budgets]
    graft = [b["graft"][key] < b["lora"][key] for b in budgets]
    won = "/".join(lab for lab, g in zip(labels, graft, strict=True) if g)
    lost = "/".join(lab for lab, g in zip(labels, graft, strict=True) if not g)
    if not won:
        return f"LoRA ahead at {lost}"
    if not lost:
        return f"graft ahead at {won}"
    first = graft.index(True)
    if all(graft[first:]):  # the graft overtook the LoRA and stayed ahead
        return f"graft ahead from {labels[first]} (LoRA at {lost})"
    return f"graft ahead at {won}, LoRA at {lost}"


def sweep_verdict(sweep: dict | None) -> list[str]:
    """What the budget sweep found, as one or two lines of at most WIDTH columns (none without a sweep).

    Args:
        sweep: SWEEP_FILE's content: model, domain, retention, and per budget the graft's and the LoRA's
            Δ perplexity vs dense (`domain_delta_pct`, `retain_delta_pct`), lower is better.
    """
    if not sweep or not sweep.get("budgets"):
        return []
    budgets = sorted(sweep["budgets"], key=lambda b: b["tokens"])
    head = f"budget sweep ({sweep['model']}, {sweep['domain']}, retention on {sweep['retention']}):"
    body = f"domain: {_axis('domain_delta_pct', budgets)}; retention: {_axis('retain_delta_pct', budgets)}"
    if len(head) + 1 + len(body) <= WIDTH:
        return [f"{head} {body}"]
    if len(body) + 2 <= WIDTH:
        return [head, f"  {body}"]
    return [
        head,
        f"  domain: {_axis('domain_delta_pct', budgets)}",
        f"  retention: {_axis('retain_delta_pct', budgets)}",
    ]


def load_sweep(path: Path = SWEEP_FILE) -> dict | None:
    """The shipped budget sweep, or None if the file is absent (a trimmed install)."""
    return json.loads(path.read_text()) if path.is_file() else None


def render_comparison(result: CompareResult, console: Console) -> None:
    """Print the table (one column per model, so it reads at 80 columns: a log, a pipe, CI), the winners, the
    notes and what the budget sweep found."""
    table = Table(
        title=f"moegraft compare — {result.steps} steps, {result.tokens:,} tokens each, same blocks",
        title_justify="left",
    )
    table.add_column("")
    for r in result.rows:
        table.add_column(r.name, justify="right", no_wrap=True)
    # rows × columns → columns × rows: HEAD[0] is the corner, the model names are the columns
    for label, *values in zip(HEAD[1:], *(cells(r)[1:] for r in result.rows), strict=True):
        table.add_row(label, *values)
    console.print(table)
    console.print(winner_line(result), highlight=False)
    for n in result.notes:
        console.print(f"- {n}", highlight=False)
    for line in sweep_verdict(load_sweep()):
        console.print(line, highlight=False, soft_wrap=True)


def comparison_markdown(result: CompareResult) -> str:
    """compare.md: what was compared, the table, one line of winners, the notes and the plot."""
    c = result
    _, g, lo = c.rows
    out = [
        "# moegraft compare: graft vs dense LoRA at equal budget",
        "",
        f"- dense: `{c.dense}`; graft: `{c.moe_dir}` training {','.join(c.spec['trainable'])} "
        f"({g.trainable_params:,} parameters, lr {c.spec['lr']:g})",
        f"- LoRA: rank {c.lora_rank} on every linear layer but lm_head, alpha = rank, dropout 0 "
        f"({lo.trainable_params:,} parameters = {c.lora_rank} × {c.lora_params_per_rank:,}, lr {c.lora_lr:g})",
        f"- budget: {c.steps} steps, {c.tokens:,} tokens each, seed {c.spec['seed']}, the same "
        f"blocks in the same order (train blocks sha256 {c.train_blocks_sha256})",
        f"- domain: {c.domain} ({c.domain_blocks} blocks × {c.seq_len}); retention: "
        f"`{c.retain}` ({c.retain_blocks} blocks × {c.seq_len}); the three models see the same blocks",
        "",
        "| " + " | ".join(HEAD) + " |",
        "|" + "---|" * len(HEAD),
    ]
    out += ["| " + " | ".join(cells(r)) + " |" for r in c.rows]
    out += ["", f"**{winner_line(c)}**", ""]
    out += [f"- {n}" for n in c.notes]
    sweep = sweep_verdict(load_sweep())
    if sweep:
        out += [
            "",
            "What the budget sweep measured (benchmarks/bench_crossover.py):",
            "",
            "```",
            *sweep,
            "```",
        ]
    out += ["", "![Δ perplexity vs dense](compare.png)", ""]
    return "\n".join(out)


def plot_deltas(result: CompareResult, path: Path) -> Path:
    """Grouped bars: domain Δ% and retention Δ% vs dense, for the graft and the LoRA (values on the bars)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    _, g, lo = result.rows
    groups = ["domain (held-out)", "retention"]
    width = 0.36
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (r, color) in enumerate(((g, "tab:blue"), (lo, "tab:orange"))):
        values = [r.domain_delta_pct, r.retain_delta_pct]
        xs = [j + (i - 0.5) * width for j in range(len(groups))]
        bars = ax.bar(xs, values, width, label=f"{r.name} ({r.trainable_params:,} trained)", color=color)
        for b, v in zip(bars, values, strict=True):
            ax.annotate(
                f"{v:+.2f}%",
                (b.get_x() + b.get_width() / 2, v),
                ha="center",
                va="bottom" if v >= 0 else "top",
                fontsize=9,
            )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("Δ perplexity vs dense (%), lower is better")
    ax.set_title(f"Equal budget: {result.steps} steps, {result.tokens:,} tokens, same blocks", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_comparison(result: CompareResult, out: Path, *copies: Path) -> None:
    """compare.json, compare.md and compare.png into `out`, and the same files into each of `copies`."""
    (out / COMPARE_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    (out / "compare.md").write_text(comparison_markdown(result))
    plot_deltas(result, out / "compare.png")
    for other in copies:
        for name in (COMPARE_FILE, "compare.md", "compare.png"):
            (other / name).write_bytes((out / name).read_bytes())
