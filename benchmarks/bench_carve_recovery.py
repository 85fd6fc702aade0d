"""Carving that keeps its quality: SmolLM2-135M carved to 75/50/25% active FFN neurons on a domain it never saw,
training-free and after the default recovery, the old method beside the new one in the same run.

Domain: Debian's python3.11-doc HOWTO documents (every fifth document held out, as bench_router.py). Calibration
(8,192 tokens) and recovery (~40k tokens) read the domain's training documents; every perplexity is on its
held-out documents. Carves (experts of 128 neurons): 75% = S 896 + 2 of 5, 50% = S 512 + 2 of 8,
25% = S 256 + 1 of 10.

- old: dense down columns (--carve-fit none), recovered the way a user of the previous release did it:
  `train --distill DENSE` with its defaults then (router + experts, next-token loss + KL, lr 1e-3).
- new: the defaults now — down projections refitted by least squares on inputs from the carved layers before
  (--carve-fit sequential), and `train` with no flag: each FFN first fitted layer by layer to the dense FFN's
  output (4 epochs over the recovery tokens), then router + experts + shared part end to end, KL only from
  the dense source recorded in moegraft.json, lr 1e-4.
- e2e: the new carve and defaults without the layer-wise phase (--layerwise-epochs 0): what that phase buys.

Also: wall time of the new 50% carve (calibration + convert) and its recovery, and (--rss) the peak RSS of
`moegraft convert --init carve` in its own process beside the dense model's size.

Usage:
    python benchmarks/bench_carve_recovery.py                 # 3 points x old/new; on an idle machine the 50%
                                                              # carve took 3.4 min, its new recovery 23 min
    python benchmarks/bench_carve_recovery.py --tokens 0 --methods old lstsq new \
        --out benchmarks/results/carve_training_free.json     # training-free only
    python benchmarks/bench_carve_recovery.py --quick         # smoke run (tiny budget, 50% only)
    python benchmarks/bench_carve_recovery.py --rss           # only the peak-RSS measurement
    python benchmarks/bench_carve_recovery.py --rss --glibc-default   # the same through the library
Writes benchmarks/results/carve_recovery.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moegraft.calibrate import calibration_blocks
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import pack, read_texts
from moegraft.demo import smollm2_gguf
from moegraft.init.carve import carve_model, resolve_carve_spec
from moegraft.models import load_causal_lm
from moegraft.train import TrainSpec, heldout_loss, train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_router import domain_split  # noqa: E402

RESULTS = HERE / "results"
POINTS = [(0.75, 896, 5, 2), (0.50, 512, 8, 2), (0.25, 256, 10, 1)]  # (active, S, E, K)
GOALS = {0.75: 3.0, 0.50: 10.0, 0.25: 40.0}  # issue 12: held-out ppl vs dense after recovery, %
# lstsq: the refit on dense inputs; e2e: the new carve and defaults without the layer-wise phase (what it buys)
METHODS = {"old": "none", "lstsq": "lstsq", "new": "sequential", "e2e": "sequential"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ppl(model, blocks: torch.Tensor) -> float:
    return math.exp(heldout_loss(model, blocks, 4))


def recovery_spec(method: str, data: Path, dense: str, tokens: int, heldout: Path) -> TrainSpec:
    common = dict(data=str(data), eval_data=str(heldout), eval_blocks=32, tokens=tokens, log_every=5)
    if method == "old":  # the previous defaults, with the teacher a user had to name
        return TrainSpec(
            **common,
            trainable=("router", "experts"),
            distill=dense,
            ce_weight=1.0,
            lr=1e-3,
            layerwise_epochs=0,
        )
    if method == "e2e":
        return TrainSpec(**common, layerwise_epochs=0)
    return TrainSpec(**common)  # everything else follows from moegraft.json


def peak_rss_kb(cmd: list[str]) -> int:
    """Peak resident set of `cmd` in its own process (/usr/bin/time -v), in kB."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))


def deepened(src: str, out: Path, factor: int) -> Path:
    """SmolLM2 with each decoder layer repeated `factor` times in a row, saved as an fp32 HF directory: the same
    width and layer size, `factor` times the depth (a model whose size, not whose layer, grows)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM

    model, tok = load_causal_lm(src)
    cfg = type(model.config).from_dict(model.config.to_dict())
    cfg.num_hidden_layers *= factor
    if hasattr(cfg, "quantization_config"):  # loaded from a GGUF: transformers refuses to save it as such
        del cfg.quantization_config
    deep = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {}
    for name, t in model.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m is None:
            state[name] = t
            continue
        for r in range(factor):
            state[f"model.layers.{int(m[1]) * factor + r}.{m[2]}"] = t
    deep.load_state_dict(state)
    deep.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def peak_rss(src: str, work: Path, calib: Path, glibc_default: bool = False) -> dict:
    """Peak RSS of a 50% carve convert, each in its own process, for SmolLM2 (the GGUF and an fp32 HF directory)
    and for a copy twice as deep: flat in the model's size when calibration holds one layer at a time.
    Beside them: the RSS of a process that only imports what convert imports (Python, torch, transformers).

    glibc_default: convert through the library (`moegraft.convert.convert`), which leaves glibc's dynamic mmap
    threshold alone, instead of the `moegraft convert` command, which holds it fixed (moegraft/malloc.py)."""
    sources = {"SmolLM2-135M (GGUF Q4_1)": src, "SmolLM2-135M (HF fp32)": str(deepened(src, work / "smollm2-hf", 1)),
               "SmolLM2 x2 deep (HF fp32)": str(deepened(src, work / "smollm2-x2", 2))}  # fmt: skip
    imports = "import moegraft.cli, moegraft.convert, moegraft.init.carve, moegraft.streamed, transformers"
    rows = {"imports only": {"peak_rss_mb": peak_rss_kb([sys.executable, "-c", imports]) / 1024}}
    for name, path in sources.items():
        out = work / "rss-carve"
        if glibc_default:
            code = (
                "import sys; from moegraft.config import GraftSpec; from moegraft.convert import convert; "
                "convert(sys.argv[1], sys.argv[2], GraftSpec.build(init='carve', num_experts=8, top_k=2, "
                "shared_size=512, calib_data=sys.argv[3]), overwrite=True, progress=False)"
            )
            kb = peak_rss_kb([sys.executable, "-c", code, path, str(out), str(calib)])
        else:
            kb = peak_rss_kb([
                sys.executable, "-m", "moegraft.cli", "convert", path, str(out),
                "--init", "carve", "--experts", "8", "--top-k", "2", "--shared-size", "512",
                "--calib-data", str(calib), "--overwrite", "--no-progress",
            ])  # fmt: skip
        p = Path(path)
        files = [p] if p.is_file() else list(p.glob("*.safetensors"))
        cfg = json.loads((out / "config.json").read_text())
        rows[name] = {
            "peak_rss_mb": kb / 1024,
            "source_mb": sum(f.stat().st_size for f in files) / 2**20,
            "carved_checkpoint_mb": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20,
            "layers": cfg["num_hidden_layers"],
        }
        log(f"{name}: peak RSS {kb / 1024:.0f} MB")
    return {"rows": rows}


def run(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_carve_recovery_"))
    tr, he = domain_split(work)
    src = str(smollm2_gguf())
    dense, tok = load_causal_lm(src)
    calib = calibration_blocks(str(tr), tok, args.calib_tokens)
    heldout = pack(read_texts(str(he), tokenizer=tok), tok, 256, max_blocks=32)
    dense_ppl = ppl(dense, heldout)
    log(f"dense held-out ppl {dense_ppl:.3f}; calib {tuple(calib.shape)}, held-out {tuple(heldout.shape)}")
    I = dense.config.intermediate_size
    points = [p for a in args.points for p in POINTS if p[0] == a]  # in the order asked
    res: dict = {
        "model": "SmolLM2-135M-Instruct",
        "domain": f"python3.11-doc howto: {len(list(tr.iterdir()))} train documents, {len(list(he.iterdir()))} held out",
        "calib_tokens": int(calib.numel()),
        "recovery_tokens": args.tokens,
        "eval_tokens": int(heldout.numel()),
        "dense_ppl": dense_ppl,
        "rows": [],
    }
    if args.append and args.out.is_file():  # rows of earlier runs on the same text and dense model stay
        old = json.loads(args.out.read_text())
        if (old["dense_ppl"], old["recovery_tokens"]) != (dense_ppl, args.tokens):
            raise SystemExit(f"--append: {args.out} measured another setting; pass another --out")
        res["rows"] = old["rows"]
        res |= {k: v for k, v in old.items() if k not in res}  # e.g. --rss's peak RSS
    for active, S, E, K in points:
        for method, fit in ((m, METHODS[m]) for m in args.methods):
            spec = resolve_carve_spec(
                GraftSpec(
                    init="carve", num_experts=E, top_k=K, shared_size=S, format="qwen2_moe",
                    carve_fit=fit, calib_data=str(tr),
                ),
                I,
            )  # fmt: skip
            t0 = time.perf_counter()
            (plan,) = carve_model(dense, calib, [spec], list(range(dense.config.num_hidden_layers)), [1 / E],
                                  progress=False)  # fmt: skip
            out = work / f"carve{int(active * 100)}-{method}"
            convert(src, out, spec, overwrite=True, progress=False, carved=plan)
            carve_s = time.perf_counter() - t0
            moe, _ = load_causal_lm(out, with_tokenizer=False)
            free = ppl(moe, heldout)
            del moe
            log(f"{active:.0%} {method}: training-free ppl {free:.2f} ({100 * (free / dense_ppl - 1):+.1f}%)")
            row = {
                "active": active, "method": method, "carve_fit": fit, "shared": S, "experts": E, "top_k": K,
                "training_free_ppl": free, "training_free_vs_dense_pct": 100 * (free / dense_ppl - 1),
                "carve_seconds": carve_s,
                "mean_calib_rel_error": sum(c.calib_rel_error for c in plan.values()) / len(plan),
            }  # fmt: skip
            if args.tokens:
                t0 = time.perf_counter()
                r = train(out, work / f"run-{out.name}", recovery_spec(method, tr, src, args.tokens, he),
                          progress=False, overwrite=True)  # fmt: skip
                moe, _ = load_causal_lm(r.model_dir, with_tokenizer=False)
                rec = ppl(moe, heldout)
                del moe
                lw = r.run_dir / "layerwise.json"
                if lw.is_file():  # the new defaults' layer-wise phase: what it alone bought, and its time
                    d = json.loads(lw.read_text())
                    row.update(
                        layerwise_ppl=d[
                            "eval_ppl"
                        ],  # on the run's --eval-data blocks: the same held-out text
                        layerwise_vs_dense_pct=100 * (d["eval_ppl"] / dense_ppl - 1),
                        layerwise_seconds=d["seconds"],
                        layerwise_mean_rel_error=[d["mean_rel_error_before"], d["mean_rel_error_after"]],
                        end_to_end_seconds=r.train_seconds,
                    )
                    log(f"{active:.0%} {method}: after the layer-wise phase ppl {d['eval_ppl']:.2f} "
                        f"({row['layerwise_vs_dense_pct']:+.1f}%, {d['seconds']:.0f} s)")  # fmt: skip
                row.update(
                    recovered_ppl=rec,
                    recovered_vs_dense_pct=100 * (rec / dense_ppl - 1),
                    recovery_seconds=time.perf_counter() - t0,
                    recovery_steps=r.steps,
                    recovery_trainable_params=r.trainable_params,
                    goal_pct=GOALS[active],
                )
                log(f"{active:.0%} {method}: recovered ppl {rec:.2f} ({row['recovered_vs_dense_pct']:+.1f}%)")
            res["rows"].append(row)
            save(res, args.out)
    return res


def table(res: dict) -> str:
    lines = [
        f"dense held-out ppl {res['dense_ppl']:.2f} ({res['eval_tokens']} tokens; {res['domain']}); "
        f"recovery {res['recovery_tokens']:,} tokens",
        "| active | method | training-free ppl | vs dense | after layer-wise | recovered ppl | vs dense | goal "
        "| carve s | recovery s (layer-wise) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        rec = (
            f"{r['recovered_ppl']:.2f} | {r['recovered_vs_dense_pct']:+.1f}% | ≤ +{r['goal_pct']:.0f}%"
            if "recovered_ppl" in r
            else "— | — | —"
        )
        lw = f"{r['layerwise_vs_dense_pct']:+.1f}%" if "layerwise_ppl" in r else "—"
        lw_s = f" ({r['layerwise_seconds']:.0f})" if "layerwise_seconds" in r else ""
        lines.append(
            f"| {r['active']:.0%} | {r['method']} ({r['carve_fit']}) | {r['training_free_ppl']:.2f} | "
            f"{r['training_free_vs_dense_pct']:+.1f}% | {lw} | {rec} | {r['carve_seconds']:.0f} | "
            f"{r.get('recovery_seconds', 0):.0f}{lw_s} |"
        )
    for key in ("rss", "rss_glibc_default"):
        if key in res:
            lines.append(rss_table(res[key]))
    return "\n".join(lines)


def rss_table(rss: dict) -> str:
    lines = [
        "",
        "| carve convert (50%) of | layers | source MB | carved checkpoint MB | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for name, r in rss["rows"].items():
        if "layers" not in r:
            lines.append(f"| ({name}) | | | | {r['peak_rss_mb']:.0f} |")
            continue
        lines.append(
            f"| {name} | {r['layers']} | {r['source_mb']:.0f} | {r['carved_checkpoint_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def save(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=40960, help="recovery budget (0: training-free only)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--points", type=float, nargs="+", default=[p[0] for p in POINTS])
    ap.add_argument("--methods", nargs="+", default=["old", "new"], choices=list(METHODS))
    ap.add_argument("--rss", action="store_true", help="only measure the carve convert's peak RSS")
    ap.add_argument(
        "--glibc-default", action="store_true", help="--rss through the library: glibc's own mmap threshold"
    )
    ap.add_argument("--append", action="store_true", help="add the rows to those already in --out")
    ap.add_argument("--quick", action="store_true", help="smoke run: 50%% only, 2,048 recovery tokens")
    ap.add_argument("--work", help="work directory (default: a new temporary one)")
    ap.add_argument("--out", type=Path, default=RESULTS / "carve_recovery.json")
    args = ap.parse_args()
    if args.quick:
        args.points, args.tokens, args.calib_tokens = [0.5], 2048, 2048
        args.out = args.out.with_name("carve_recovery_quick.json")
    if args.rss:
        res = json.loads(args.out.read_text()) if args.out.is_file() else {}
        work = Path(args.work or tempfile.mkdtemp(prefix="bench_carve_rss_"))
        tr, _ = domain_split(work)
        key = "rss_glibc_default" if args.glibc_default else "rss"
        res[key] = peak_rss(str(smollm2_gguf()), work, tr, args.glibc_default)
        save(res, args.out)
        print(rss_table(res[key]))
        return
    res = run(args)
    print(table(res))


if __name__ == "__main__":
    main()
