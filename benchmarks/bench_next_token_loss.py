"""The next-token loss with shifted targets (moegraft's, as transformers' own loss does it) against sliced logits
(`logits[:, :-1]`, what moegraft did before): forward + backward time on this CPU, and whether they agree.

Sliced logits copy (B, T-1, V) and their backward zero-fills a (B, T, V) gradient; shifted targets read the
logits as a view. At SmolLM2's shapes (4 × 256 tokens, vocabulary 49152, fp32), alternating A and B.

Usage:
    python benchmarks/bench_next_token_loss.py     # ~10 s
Writes benchmarks/results/next_token_loss.json and prints a table. Run it alone: it is a timing benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moegraft.train.losses import next_token_loss

HERE = Path(__file__).resolve().parent


def sliced(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The former loss: the logits of every position but the last, against the next tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())  # (B·(T-1), V)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "next_token_loss.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)  # (B, T)
    base = torch.randn(args.batch, args.seq_len, args.vocab, generator=g)  # (B, T, V)
    ms: dict[str, list[float]] = {"sliced logits": [], "shifted targets": []}
    out = {}
    for _ in range(args.reps):
        for name, f in (("sliced logits", sliced), ("shifted targets", next_token_loss)):
            x = base.clone().requires_grad_(True)
            t = time.perf_counter()
            loss = f(x, ids)
            loss.backward()
            ms[name].append((time.perf_counter() - t) * 1e3)
            out[name] = (loss.detach(), x.grad)
    (la, ga), (lb, gb) = out.values()
    doc = {
        "shape": [args.batch, args.seq_len, args.vocab], "dtype": "float32", "reps": args.reps,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_before": load_before, "load_after": os.getloadavg(),
        "ms": {k: statistics.median(v) for k, v in ms.items()}, "runs_ms": ms,
        "loss_equal": bool(torch.equal(la, lb)), "grad_max_abs_diff": float((ga - gb).abs().max()),
    }  # fmt: skip
    print(f"| loss (B, T, V) = {tuple(doc['shape'])} | forward + backward ms (median of {args.reps}) |")
    print("|---|---|")
    for k, v in doc["ms"].items():
        print(f"| {k} | {v:.0f} |")
    print(f"\nloss equal: {doc['loss_equal']}; gradient max |diff| {doc['grad_max_abs_diff']:.1e}")
    print(f"load {load_before[0]:.2f} before, {doc['load_after'][0]:.2f} after")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
