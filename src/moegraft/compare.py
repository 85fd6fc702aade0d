"""The equal-budget comparison recipe: the graft against a dense LoRA of the same trainable size, same data and steps.

In: DENSE (HF directory or .gguf), MOE_DIR (its `moegraft convert` output), one TrainSpec. Out: OUT/graft and
OUT/lora (two runs of `moegraft train`'s recipe, the LoRA's a DenseLoraRecipe), OUT/compare.json, compare.md,
compare.png, and a CompareResult.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from moegraft.errors import MoegraftError
from moegraft.io.writer import atomic_output_dir, check_output
from moegraft.models import load_adapter, load_causal_lm, peft_calls
from moegraft.train.loop import TrainRecipe, train
from moegraft.train.spec import SPEC_FILE, TrainSpec, read_meta

COMPARE_FILE = "compare.json"
ROWS = ("dense", "graft", "lora")


class CompareError(MoegraftError):
    """The comparison cannot be made fairly (e.g. the two models tokenise the data differently)."""


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

    def winner_line(self) -> str:
        return "Won — " + "; ".join(f"{axis}: {who}" for axis, who in self.winners().items())

    def _cells(self, r: Row) -> list[str]:
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

    _HEAD = (
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

    def render(self, console: Console) -> None:
        """Print the table, the winners and the notes."""
        table = Table(
            title=f"moegraft compare — {self.steps} steps, {self.tokens:,} tokens each, same blocks",
            title_justify="left",
        )
        for i, h in enumerate(self._HEAD):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for r in self.rows:
            table.add_row(*self._cells(r))
        console.print(table)
        console.print(self.winner_line(), highlight=False)
        for n in self.notes:
            console.print(f"- {n}", highlight=False)

    def markdown(self) -> str:
        """compare.md: what was compared, the table, one line of winners, the notes and the plot."""
        _, g, lo = self.rows
        out = [
            "# moegraft compare: graft vs dense LoRA at equal budget",
            "",
            f"- dense: `{self.dense}`; graft: `{self.moe_dir}` training {','.join(self.spec['trainable'])} "
            f"({g.trainable_params:,} parameters, lr {self.spec['lr']:g})",
            f"- LoRA: rank {self.lora_rank} on every linear layer but lm_head, alpha = rank, dropout 0 "
            f"({lo.trainable_params:,} parameters = {self.lora_rank} × {self.lora_params_per_rank:,}, lr {self.lora_lr:g})",
            f"- budget: {self.steps} steps, {self.tokens:,} tokens each, seed {self.spec['seed']}, the same "
            f"blocks in the same order (train blocks sha256 {self.train_blocks_sha256})",
            f"- domain: {self.domain} ({self.domain_blocks} blocks × {self.seq_len}); retention: "
            f"`{self.retain}` ({self.retain_blocks} blocks × {self.seq_len}); the three models see the same blocks",
            "",
            "| " + " | ".join(self._HEAD) + " |",
            "|" + "---|" * len(self._HEAD),
        ]
        out += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        out += ["", f"**{self.winner_line()}**", ""]
        out += [f"- {n}" for n in self.notes]
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


def lora_size(model: nn.Module) -> tuple[int, int]:
    """(Σ (in + out), smallest dimension) over the nn.Linear layers PEFT's "all-linear" adapts (all but lm_head).

    A rank-r LoRA on a Linear(in, out) trains r · (in + out) parameters, so the whole adapter has r · Σ.
    """
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    if not linears:
        raise CompareError(f"{type(model).__name__} has no linear layer besides lm_head to adapt")
    return sum(m.in_features + m.out_features for m in linears), min(
        min(m.in_features, m.out_features) for m in linears
    )


def lora_rank(target: int, per_rank: int) -> int:
    """The rank whose LoRA size r · per_rank is closest to `target` (at least 1).

    The size is linear in r, so the nearest integer to target / per_rank is the best rank: it misses the target
    by at most per_rank / 2 (unless even rank 1 is too big).
    """
    return max(1, round(target / per_rank))


class DenseLoraRecipe(TrainRecipe):
    """`moegraft train`'s recipe on the dense model wrapped in an all-linear LoRA whose trainable parameter count
    is closest to `target` (the graft's)."""

    adapter = True

    def __init__(
        self, dense: str | Path, out: Path, spec: TrainSpec, *, target: int, base_name: str, **kwargs
    ):
        super().__init__(dense, out, spec, **kwargs)
        self.target, self.base_name = target, base_name

    def prepare_model(self, model: nn.Module, tok) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        self.per_rank, self.smallest = lora_size(model)
        self.rank = lora_rank(self.target, self.per_rank)
        config = LoraConfig(
            r=self.rank, lora_alpha=self.rank, lora_dropout=0.0, target_modules="all-linear", bias="none"
        )
        with peft_calls():
            peft_model = get_peft_model(model, config)
        peft_model.peft_config["default"].base_model_name_or_path = self.base_name
        return peft_model


def _eval_device(spec: TrainSpec) -> str:
    if spec.device != "auto":
        return spec.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def compare(
    dense: str | Path,
    moe_dir: str | Path,
    out: str | Path,
    spec: TrainSpec,
    *,
    lora_lr: float = 1e-3,
    retain_data: str = "stdlib:heldout",
    report_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    callback: Callable[[str, dict], None] | None = None,
) -> CompareResult:
    """Train the graft and a dense LoRA of the same trainable size on the same blocks, then score all three.

    Args:
        dense: the dense model MOE_DIR was converted from (HF directory or .gguf file).
        moe_dir: its `moegraft convert` output.
        out: OUT (must not exist unless `overwrite`): graft/, lora/ (train runs), compare.json/.md/.png.
        spec: the training run for both; the LoRA's copy takes `lora_lr` and drops the balance terms (no router).
        lora_lr: the LoRA's peak learning rate (LoRA factors want a different lr than fresh experts).
        retain_data: other text, evaluated on the same blocks for all three: shows forgetting.
        report_dir: also write each model's `moegraft eval` report to REPORT/{dense,graft,lora}.
        progress: live bars of both training runs.
        overwrite: replace an existing OUT (and REPORT).
        callback: `callback(run, row)` after each optimizer step of run "graft" or "lora" (tests, notebooks).

    Returns:
        The three rows (perplexities, deltas, trainable parameters, time, cost) and what made them comparable.

    Raises:
        CompareError, SpecError, SourceError, OutputExistsError (all MoegraftError).
    """
    from moegraft.eval.evaluate import evaluate, token_blocks
    from moegraft.io.source import read_config
    from moegraft.plan import plan

    out, moe_dir = Path(out), Path(moe_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CompareError("compare runs in one process; for several GPUs run `moegraft train` per model")
    check_output(out, overwrite)
    if report_dir is not None:
        check_output(Path(report_dir), overwrite)
    dense_src = Path(dense).expanduser()
    base_name = str(dense_src.resolve()) if dense_src.exists() else str(dense)
    spec = spec.for_checkpoint(read_meta(moe_dir))  # what the graft's run will train, at which lr
    # the same run but for what a router-less model cannot have; `trainable` records what all-linear adapts
    lora_spec = TrainSpec.build(
        **{
            **spec.model_dump(),
            "lr": lora_lr,
            "balance": "none",
            "aux_coef": 0.0,
            "z_coef": 0.0,
            "trainable": ("attention", "dense"),
        }
    )
    notes: list[str] = []

    def on_step(run: str):
        return None if callback is None else (lambda row: callback(run, row))

    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_output_dir(out, overwrite=overwrite))
        rtmp = None if report_dir is None else stack.enter_context(atomic_output_dir(report_dir, overwrite))

        # (a) the graft, exactly as `moegraft train` runs it
        graft = train(moe_dir, tmp / "graft", spec, progress=progress, callback=on_step("graft"))

        # (b) the dense LoRA, sized to the graft's trainable count, through the same recipe and data
        lora_run = DenseLoraRecipe(
            dense,
            tmp / "lora",
            lora_spec,
            target=graft.trainable_params,
            base_name=base_name,
            progress=progress,
            callback=on_step("lora"),
        )
        lora = lora_run.run()
        _check_same_data(tmp / "graft", tmp / "lora")
        if lora_run.rank > lora_run.smallest:
            notes.append(
                f"LoRA rank {lora_run.rank} exceeds the smallest linear dimension {lora_run.smallest}: those "
                "adapters have more factors than their matrix has rank"
            )

        # the three models on the same blocks: the held-out blocks train() scored, and the retention set
        domain = graft.eval_blocks  # (N, T), or (N, 2, T) with a loss mask
        if domain.dim() == 3:
            domain = domain[:, 0]  # (N, T) the ids
            notes.append(
                "--loss-mask assistant: perplexities here count every token, not only the assistant's"
            )
        device = _eval_device(spec)
        dense_model, tok = load_causal_lm(dense, device=device)
        T = spec.seq_len
        if spec.data.startswith("stdlib:") and retain_data.startswith("stdlib:"):
            notes.append(
                f"--data {spec.data} and --retain-data {retain_data} are both stdlib docstring prose: retention "
                "here is held-out generalisation on the same kind of text, not forgetting of other text"
            )
        retain = token_blocks(retain_data, tok, seq_len=T, max_tokens=spec.eval_blocks * T)  # (N', T)
        budget = max(len(domain), len(retain)) * T

        def score(model: nn.Module, name: str, baseline: nn.Module | None):
            return evaluate(
                model,
                baseline=baseline,
                data=domain,
                retain_data=retain,
                max_tokens=budget,
                seq_len=T,
                batch_size=spec.batch,
                device=device,
                report_dir=None if rtmp is None else rtmp / name,
            )

        evals = {"dense": score(dense_model, "dense", None)}
        graft_model, _ = load_causal_lm(graft.model_dir, device=device, with_tokenizer=False)
        graft_model.name_or_path = str(out / "graft" / "model")  # where it will be, not the temporary
        evals["graft"] = score(graft_model, "graft", dense_model)
        del graft_model
        lora_model, _ = load_adapter(lora.model_dir, device=device, with_tokenizer=False)  # merged
        lora_model.name_or_path = f"{dense} + LoRA {out / 'lora' / 'model'} (merged)"
        evals["lora"] = score(lora_model, "lora", dense_model)
        del lora_model, dense_model

        # cost per token from config.json alone (plan's accounting) at the training context
        dense_cost = plan(read_config(str(dense)), context=T).dense
        graft_cost = plan(read_config(str(moe_dir)), context=T).dense  # the MoE as it is
        unmerged = (dense_cost.flops_per_token + 2 * lora.trainable_params) / dense_cost.flops_per_token
        notes.append(
            "the LoRA merged into the dense weights costs what the dense model costs; unmerged, its adapters add "
            f"2 × {lora.trainable_params:,} FLOPs/token (x{unmerged:.3f} vs dense)"
        )
        notes.append(
            f"active params and FLOPs/token from `moegraft plan` at context {T}; train s = the training loop alone "
            "(loading, evaluation and saving excluded)"
        )
        notes.append(
            "Δ vs dense = perplexity / dense perplexity − 1; the dense FFN of the graft is frozen and always on, "
            "the LoRA changes the dense weights themselves"
        )
        rows = (
            _row("dense", evals["dense"], evals["dense"], 0, None, dense_cost, dense_cost),
            _row(
                "graft",
                evals["graft"],
                evals["dense"],
                graft.trainable_params,
                graft.train_seconds,
                graft_cost,
                dense_cost,
            ),
            _row(
                f"LoRA r={lora_run.rank}",
                evals["lora"],
                evals["dense"],
                lora.trainable_params,
                lora.train_seconds,
                dense_cost,
                dense_cost,
            ),
        )
        saved = json.loads((tmp / "graft" / SPEC_FILE).read_text())["resolved"]
        result = CompareResult(
            dense=str(dense),
            moe_dir=str(moe_dir),
            out=out,
            rows=rows,
            lora_rank=lora_run.rank,
            lora_params_per_rank=lora_run.per_rank,
            lora_lr=lora_lr,
            steps=graft.steps,
            tokens=graft.tokens,
            seq_len=T,
            domain="the held-out tail of --data"
            if spec.eval_data is None
            else f"--eval-data `{spec.eval_data}`",
            domain_blocks=len(domain),
            retain=retain_data,
            retain_blocks=len(retain),
            train_blocks_sha256=saved["train_blocks_sha256"],
            spec=spec.model_dump(),
            notes=notes,
        )
        (tmp / COMPARE_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        (tmp / "compare.md").write_text(result.markdown())
        plot_deltas(result, tmp / "compare.png")
        if rtmp is not None:
            for name in (COMPARE_FILE, "compare.md", "compare.png"):
                (rtmp / name).write_bytes((tmp / name).read_bytes())
    return result


def _row(name: str, ev, dense_ev, trainable: int, seconds: float | None, cost, dense_cost) -> Row:
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


def _check_same_data(*runs: Path) -> None:
    """Raise CompareError unless the runs' saved specs record the same train/eval blocks, seed and batches."""
    keys = ("train_blocks_sha256", "eval_blocks_sha256", "steps", "global_batch", "tokens_per_step")
    docs = [json.loads((run / SPEC_FILE).read_text()) for run in runs]
    first = docs[0]
    for run, doc in zip(runs[1:], docs[1:], strict=True):
        diff = [k for k in keys if doc["resolved"][k] != first["resolved"][k]]
        if doc["spec"]["seed"] != first["spec"]["seed"]:
            diff.append("seed")
        if diff:
            raise CompareError(
                f"the graft and the LoRA runs differ in {', '.join(diff)} ({run.name}): DENSE and MOE_DIR must "
                "share a tokenizer, so that both train on the same token blocks"
            )
