"""Where a MoE's step time goes on CPU: the FFN blocks against the rest, and the matmuls' memory bandwidth.

The same three models as `bench_experts.py` (SmolLM2-135M dense; the additive graft 8 × 128 top-2; the carve
shared 384 + 2 of 8 × 144), fp32, on moegraft's experts implementation. Each step is timed twice: whole, and
with every decoder layer's FFN block (`mlp`: the dense MLP or the whole MoE block, router and shared expert
included) replaced by zeros. The difference is the FFN part's time inside the real step (the weights stream from
memory as they do in the model, which a one-layer microbenchmark with warm caches does not show); the rest is
attention, norms, the KV cache and the LM head, the same code in every model. Variants alternate within each
repetition; every figure is the minimum over repetitions (steps of 16 decode tokens, or one prefill), which on
a shared machine is the least disturbed.

Then the bandwidth of the GEMVs a decode step runs, weight shapes of these models: `F.linear` of one token over
256 MB of distinct weights (so they come from memory, not cache), in GB/s of weights read.

Usage (alone on the machine):
    python benchmarks/bench_step_parts.py           # ~10 min on 2 cores (two converts, then timing)
    python benchmarks/bench_step_parts.py --quick   # smoke run
Writes benchmarks/results/step_parts.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_experts import log, prefill_s, specs
from moegraft.convert import convert
from moegraft.data import pack, read_texts
from moegraft.demo import smollm2_gguf
from moegraft.models import cached_forward, load_causal_lm

HERE = Path(__file__).resolve().parent


@contextmanager
def ffn_zeroed(model):
    """Every decoder layer's `mlp` returns zeros (the residual stream then skips it); restored on exit."""
    mlps = [layer.mlp for layer in model.model.layers]
    for m in mlps:
        m.forward = torch.zeros_like  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for m in mlps:
            del m.forward


@torch.no_grad()
def decode_step_min_s(model, prompt: torch.Tensor, steps: int) -> float:
    """Fastest of `steps` batch-1 greedy steps after `prompt` (1, T) is in the cache."""
    logits, cache = cached_forward(model, prompt)
    nxt = logits[:, -1:].argmax(-1)  # (1, 1)
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, cache = cached_forward(model, nxt, cache)
        best = min(best, time.perf_counter() - t0)
        nxt = logits[:, -1:].argmax(-1)
    return best


def active_ffn_weights(model) -> int:
    """Matmul weights one token reads in all FFN blocks: routed experts count K of E."""
    n = 0
    for layer in model.model.layers:
        k_of_e = 1.0
        if (experts := getattr(layer.mlp, "experts", None)) is not None:
            k_of_e = layer.mlp.gate.top_k / experts.num_experts
        for name, p in layer.mlp.named_parameters():
            n += p.numel() * (k_of_e if name.startswith("experts.") else 1.0)
    return int(n)


def gemv_gbps(shapes: list[tuple[int, int]], threads: int, reps: int) -> dict[str, float]:
    """GB/s of weights read by F.linear of one token, cycling over distinct (out, in) weights, 256 MB of them
    (8x this CPU's L3: they come from memory, as a decode step's do)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        for o, i in shapes:
            ws = [torch.randn(o, i) for _ in range(max(2, -(-(64 << 20) // (o * i))))]  # 64 Mi floats
            x = torch.randn(1, i)
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                for w in ws:
                    F.linear(x, w)
                best = min(best, time.perf_counter() - t0)
            out[f"{o}x{i}"] = o * i * 4 * len(ws) / best / 1e9
    finally:
        torch.set_num_threads(prev)
    return out


def table(res: dict) -> str:
    lines = [
        f"SmolLM2-135M, fp32, {res['threads']} threads, min of {res['reps']} alternated repetitions (ms)",
        f"{'model':6s} {'stage':8s} {'step':>8s} {'rest':>8s} {'FFN':>8s} {'FFN ÷ dense':>12s} "
        f"{'FFN weights ÷ dense':>20s} {'step ÷ dense':>13s}",
    ]
    for name, by_stage in res["ms"].items():
        for s, v in by_stage.items():
            d = res["ms"]["dense"][s]
            ffn, dffn = v["step"] - v["rest"], d["step"] - d["rest"]
            lines.append(
                f"{name:6s} {s:8s} {v['step']:8.1f} {v['rest']:8.1f} {ffn:8.1f} {ffn / dffn:12.3f} "
                f"{res['ffn_weights'][name] / res['ffn_weights']['dense']:20.3f} {v['step'] / d['step']:13.3f}"
            )
    lines.append("\nGEMV bandwidth, F.linear of one token (GB/s of weights): shape (out x in)")
    for th, by_shape in res["gemv_gbps"].items():
        lines.append(f"  {th} thread(s): " + "  ".join(f"{k} {v:5.1f}" for k, v in by_shape.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short prompt, one repetition")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 1 if args.quick else args.reps
    ctx, steps, prefill = (32, 4, (2, 32)) if args.quick else (256, 16, (8, 256))
    calib = 1024 if args.quick else args.calib_tokens
    gguf = smollm2_gguf()
    res: dict = {
        "model": gguf.name,
        "threads": torch.get_num_threads(),
        "reps": reps,
        "context": ctx,
        "decode_steps": steps,
        "prefill": prefill,
    }
    with tempfile.TemporaryDirectory(prefix="bench-step-parts-") as tmp:
        dense, tok = load_causal_lm(gguf)
        models = {"dense": dense}
        for name, spec in specs(False, calib).items():
            models[name] = load_causal_lm(
                convert(str(gguf), Path(tmp) / name, spec, progress=False).out, with_tokenizer=False
            )[0]
            log(f"converted {name}")
        blocks = pack(read_texts("stdlib:heldout"), tok, max(ctx, prefill[1]), max_blocks=prefill[0] + 1)
        run = {
            "decode": lambda m: decode_step_min_s(m, blocks[-1:, :ctx], steps),
            "prefill": lambda m: prefill_s(m, blocks[: prefill[0], : prefill[1]]),
        }
        best: dict = {n: {s: {"step": float("inf"), "rest": float("inf")} for s in run} for n in models}
        for rep in range(reps + (0 if args.quick else 1)):  # the first is a warm-up
            for s, f in run.items():
                for n, m in models.items():
                    t = f(m)
                    with ffn_zeroed(m):
                        r = f(m)
                    if rep or args.quick:
                        best[n][s]["step"] = min(best[n][s]["step"], t * 1e3)
                        best[n][s]["rest"] = min(best[n][s]["rest"], r * 1e3)
            log(f"repetition {rep + 1}")
        res["ms"] = best
        res["ffn_weights"] = {n: active_ffn_weights(m) for n, m in models.items()}
        cfg = dense.config
        H, I = cfg.hidden_size, cfg.intermediate_size
        shapes_ = [(I, H), (H, I)]
        for n in ("graft", "carve"):
            c = models[n].config
            shapes_ += [
                (c.shared_expert_intermediate_size, H),
                (H, c.shared_expert_intermediate_size),
                (2 * c.moe_intermediate_size, H),
                (H, c.moe_intermediate_size),
            ]
        shapes_.append((cfg.vocab_size, H))
        shapes_ = list(dict.fromkeys(shapes_))
        del models, dense
    res["gemv_gbps"] = {
        str(th): gemv_gbps(shapes_, th, reps=3 if args.quick else 15)
        for th in dict.fromkeys((1, res["threads"]))
    }
    out = args.out or (
        Path(tempfile.gettempdir()) / "step_parts_quick.json"
        if args.quick
        else HERE / "results" / "step_parts.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
