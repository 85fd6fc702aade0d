"""Write docs/measured.md from benchmarks/results/*.json: one section per benchmark, each naming its file.

Run `python docs/gen_measured.py` after a benchmark rewrites its JSON; `--check` exits 1 when the committed
page differs from what the JSON gives now (tests/test_docs.py does the same check). Output is deterministic:
only the JSON's values, in the JSON's own order, rounded here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "measured.md"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def table(headers: list[str], rows: Iterable[Iterable[object]], right: Iterable[int] = ()) -> str:
    """A Markdown table; `right` are the column indices aligned right (numbers)."""
    right = set(right)

    def cell(c: object) -> str:
        return str(c).replace("|", "\\|")  # a bare | would split the cell

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:+.{digits}f}%"


def num(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def ratio(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}×"


def grouped(rows: list[dict], outer: str, inner: str) -> dict:
    """rows keyed by r[outer], then r[inner], in the JSON's order."""
    out: dict = {}
    for r in rows:
        out.setdefault(r[outer], {})[r[inner]] = r
    return out


def source(*names: str) -> str:
    return "Source: " + ", ".join(f"[`{n}`](../benchmarks/results/{n})" for n in names) + "."


# -- one function per benchmark: (title, files it reads, body) ------------------------------------------


def router() -> tuple[str, list[str], str]:
    d = load("router.json")
    dense = d["dense"]
    rows = []
    for name, v in d["variants"].items():
        init, tr = v["init"], v["trained"]
        rows.append(
            [
                f"`{name}`",
                num(init["worst_cv"]),
                num(init["worst_min_share"]),
                init["under_10pct_total"],
                num(init["mean_entropy_norm"]),
                pct(tr["domain_vs_dense_pct"]),
                pct(tr["retention_vs_dense_pct"]),
                num(tr["worst_cv"]),
                num(tr["mean_entropy_norm"]),
                "yes" if tr["dense_path_bit_identical"] else "no",
            ]
        )
    body = (
        f"{d['model']}, {d['graft']}; domain: {d['domain']}; {d['train_tokens']:,} training tokens, "
        f"{d['eval_tokens']:,} evaluation tokens. Dense perplexity: domain {num(dense['domain_ppl'])}, "
        f"retention {num(dense['retention_ppl'])}.\n\n"
        + table(
            [
                "router × experts init",
                "CV at init",
                "least-used share",
                "experts < 10%",
                "H/ln E",
                "domain Δ trained",
                "retention Δ",
                "CV trained",
                "H/ln E trained",
                "dense path identical",
            ],
            rows,
            right=range(1, 9),
        )
        + "\n\nCV: the worst layer's load coefficient of variation; least-used share: the least-used expert's "
        "share of its fair load (worst layer); H/ln E: mean normalised router entropy (1 = uniform); Δ: "
        "perplexity against dense after `train`'s defaults."
    )
    return "Router initialisation, then training (`bench_router.py`)", ["router.json"], body


def router_compare() -> tuple[str, list[str], str]:
    d = load("router_compare.json")
    rows = []
    for r in d["rows"].values():
        rows.append(
            [
                r["name"],
                num(r["domain_ppl"]),
                pct(r["domain_delta_pct"]),
                num(r["retain_ppl"]),
                pct(r["retain_delta_pct"]),
                f"{r['trainable_params']:,}",
                num(r["train_seconds"], 0),
                ratio(r["flops_ratio"], 3),
                num(r["domain_kl"], 3),
            ]
        )
    body = (
        f"{d['steps']} steps, {d['tokens']:,} tokens of {d['seq_len']}; LoRA rank {d['lora_rank']} "
        f"(lr {d['lora_lr']}); domain: {d['domain_blocks']} held-out blocks, retention: `{d['retain']}` "
        f"({d['retain_blocks']} blocks).\n\n"
        + table(
            [
                "model",
                "domain ppl",
                "Δ vs dense",
                "retention ppl",
                "Δ vs dense",
                "trainable",
                "train s",
                "FLOPs/token",
                "KL to dense",
            ],
            rows,
            right=range(1, 9),
        )
    )
    return "Graft vs dense LoRA of equal size (`bench_router.py --compare`)", ["router_compare.json"], body


def router_timing() -> tuple[str, list[str], str]:
    d = load("router_timing.json")
    body = (
        table(
            ["convert", "runs (s)", "median (s)"],
            [
                [
                    "with calibration",
                    ", ".join(num(s, 1) for s in d["with_calibration_s"]),
                    num(median(d["with_calibration_s"]), 1),
                ],
                ["without", ", ".join(num(s, 1) for s in d["without_s"]), num(median(d["without_s"]), 1)],
            ],
            right=[2],
        )
        + f"\n\nRatio of the medians: {ratio(d['ratio_median'], 1)}."
    )
    return "Conversion time with calibration (`bench_router.py --timing`)", ["router_timing.json"], body


def train() -> tuple[str, list[str], str]:
    d = load("train.json")
    rows = [["dense", num(d["dense"]["ppl"]), "—", "—", "—", "—"]]
    for key, label in (
        ("moe_before", "MoE, before training"),
        ("moe_balanced", "MoE, aux + z"),
        ("moe_unbalanced", "MoE, no balancing"),
    ):
        r = d[key]
        rows.append(
            [
                label,
                num(r["ppl"]),
                num(r["worst_cv"]),
                r["dead_total"],
                r["under_10pct_total"],
                f"{r.get('trainable_params', 0):,}",
            ]
        )
    lora = d["lora"]
    rows.append(
        [f"dense LoRA r={lora['rank']}", num(lora["ppl"]), "—", "—", "—", f"{lora['trainable_params']:,}"]
    )
    g = d["graft"]
    body = (
        f"{d['model']}: {g['num_experts']} experts × {g['expert_size']}, top-{g['top_k']}, init `{g['init']}`, "
        f"random router (before calibration existed); {d['steps']} steps, {d['tokens']:,} tokens, lr {d['lr']}.\n\n"
        + table(
            ["run", "held-out ppl", "worst CV", "dead experts", "experts < 10%", "trainable"],
            rows,
            right=range(1, 6),
        )
    )
    return "Router training before calibration (`bench_train.py`)", ["train.json"], body


def carve_training_free() -> tuple[str, list[str], str]:
    d = load("carve_training_free.json")
    by_active = grouped(d["rows"], "active", "carve_fit")
    rows = []
    for active, fits in by_active.items():
        any_row = next(iter(fits.values()))
        shape = f"S {any_row['shared']} + {any_row['top_k']} of {any_row['experts']}"
        cells = [
            f"{num(f['training_free_ppl'])} ({pct(f['training_free_vs_dense_pct'])})" if f else "—"
            for f in (fits.get(k) for k in ("none", "lstsq", "sequential"))
        ]
        rows.append([f"{active:.0%}", shape, *cells])
    body = (
        f"{d['model']}; domain: {d['domain']}; {d['calib_tokens']:,} calibration tokens, {d['eval_tokens']:,} "
        f"held-out tokens; dense perplexity {num(d['dense_ppl'])}. Held-out perplexity (Δ vs dense) by "
        "`--carve-fit`:\n\n"
        + table(["active", "carve", "none", "lstsq", "sequential (default)"], rows, right=[2, 3, 4])
    )
    return "Carve, training-free (`bench_carve_recovery.py --tokens 0`)", ["carve_training_free.json"], body


def cmoe() -> tuple[str, list[str], str]:
    d = load("cmoe.json")
    by_level = grouped(d["rows"], "level", "method")
    no_refit = {f"{float(k) * 100:.0f}": v for k, v in d["moegraft_no_refit_reused"].items()}
    rows = []
    for level, m in by_level.items():
        s = m["moegraft"]["settings"]
        shape = f"S {s['shared_size']} + {s['top_k']} of {s['num_experts']} × {s['expert_size']}"
        rows.append(
            [
                level,
                shape,
                f"{num(m['moegraft']['ppl'])} ({pct(m['moegraft']['vs_dense_pct'], 0)})",
                f"{num(m['cmoe']['ppl'])} ({pct(m['cmoe']['vs_dense_pct'], 0)})",
                num(no_refit.get(level)),
            ]
        )
    body = (
        f"{d['model']}; CMoE at `{d['cmoe']['mirror_head'][:7]}`; dense perplexity {num(d['dense_ppl'])}. "
        "Level `50f` is 50% with experts of 64.\n\n"
        + table(
            ["level %", "moegraft carve", "moegraft", "CMoE", "moegraft `--carve-fit none`"],
            rows,
            right=[2, 3, 4],
        )
        + f"\n\n{d['note']}."
    )
    return "Carve vs CMoE, training-free (`bench_cmoe.py`)", ["cmoe.json"], body


def carve_recovery() -> tuple[str, list[str], str]:
    d = load("carve_recovery.json")
    rows = []
    for r in d["rows"]:
        rows.append(
            [
                f"{r['active']:.0%}",
                r["method"],
                r["carve_fit"],
                pct(r["training_free_vs_dense_pct"]),
                pct(r.get("layerwise_vs_dense_pct")),
                pct(r["recovered_vs_dense_pct"]),
                f"≤ +{r['goal_pct']:g}%",
            ]
        )
    rss_rows = []
    default, glibc = d["rss"]["rows"], d["rss_glibc_default"]["rows"]
    for name, r in default.items():
        rss_rows.append(
            [
                name,
                r.get("layers", ""),
                num(r.get("source_mb"), 0) if "source_mb" in r else "",
                num(r.get("carved_checkpoint_mb"), 0) if "carved_checkpoint_mb" in r else "",
                num(r["peak_rss_mb"], 0),
                num(glibc[name]["peak_rss_mb"], 0) if name in glibc else "—",
            ]
        )
    body = (
        f"{d['model']}; domain: {d['domain']}; {d['recovery_tokens']:,} recovery tokens; dense perplexity "
        f"{num(d['dense_ppl'])}. Held-out perplexity against dense: training-free, after the layer-wise "
        "phase, after recovery. `old`: dense down columns, router + experts on next-token loss + KL; `new`: "
        "today's default; `e2e`: new without the layer-wise phase.\n\n"
        + table(
            ["active", "method", "carve fit", "training-free", "layer-wise", "recovered", "goal"],
            rows,
            right=[3, 4, 5],
        )
        + "\n\nPeak RSS of a 50% carve convert in its own process (MB), with moegraft's mmap threshold and with "
        "glibc's default (`--rss`, `--rss --glibc-default`):\n\n"
        + table(
            ["carve convert of", "layers", "source MB", "carved MB", "peak RSS", "glibc default"],
            rss_rows,
            right=range(1, 6),
        )
    )
    return "Carve recovery and memory (`bench_carve_recovery.py`)", ["carve_recovery.json"], body


def cmoe_recovery() -> tuple[str, list[str], str]:
    d = load("cmoe_recovery.json")
    by_level = grouped(d["rows"], "level", "method")

    def cells(r: dict) -> list[str]:
        return [
            f"{num(r['ppl'])} ({pct(r['vs_dense_pct'], 0)})",
            f"{num(r.get('recovered_ppl'))} ({pct(r.get('recovered_vs_dense_pct'), 0)})",
            num(r.get("recovery_seconds"), 0),
        ]

    rows = [[lv, *cells(m["moegraft"]), *cells(m["cmoe"])] for lv, m in by_level.items() if len(m) == 2]
    rec = d["recovery"]
    body = (
        f"{d['model']}; dense perplexity {num(d['dense_ppl'])}; recovery on {rec['tokens']:,} tokens, "
        f"{rec['order']}. moegraft: {rec['moegraft']}. CMoE: {rec['cmoe']}. Recovery seconds: moegraft's "
        "from carve_recovery.json (the 50% row on an idle machine, the others beside other jobs), CMoE's from "
        "this run.\n\n"
        + table(
            ["level %", "moegraft free", "moegraft recovered", "s", "CMoE free", "CMoE recovered", "s"],
            rows,
            right=range(1, 7),
        )
    )
    return (
        "Carve vs CMoE after equal-token recovery (`bench_cmoe.py --recover`)",
        ["cmoe_recovery.json"],
        body,
    )


# the 50% carve's recovery runs, by budget: 10,240, 40,960 and 163,840 tokens
CARVE_CURVE = ("carve_recovery_10k.json", "carve_recovery.json", "carve_recovery_160k.json")


def carve_curve() -> tuple[str, list[str], str]:
    """The 50% carve's held-out perplexity after recovery on growing budgets, each run's own carve beside it."""
    runs = [load(f) for f in CARVE_CURVE]
    rows = [
        [
            f"{d['recovery_tokens']:,}",
            f"{num(r['training_free_ppl'])} ({pct(r['training_free_vs_dense_pct'])})",
            f"{num(r['recovered_ppl'])} ({pct(r['recovered_vs_dense_pct'])})",
            num(r["recovery_seconds"], 0),
        ]
        for d in runs
        for r in d["rows"]
        if r["active"] == 0.5 and r["method"] == "new"
    ]
    body = (
        "The 50% carve (S 512 + 2 of 8 × 128, default fit) recovered with `train`'s defaults on growing "
        f"budgets of the same domain; dense perplexity {num(runs[1]['dense_ppl'])}. Each run carves afresh.\n\n"
        + table(
            ["recovery tokens", "training-free ppl", "recovered ppl", "recovery s"], rows, right=[1, 2, 3]
        )
    )
    return "Carve recovery by budget (`bench_carve_recovery.py --points 0.5`)", list(CARVE_CURVE), body


def crossover() -> tuple[str, list[str], str]:
    d = load("crossover.json")

    def cells(r: dict) -> list[str]:
        return [
            f"{num(r['domain']['ppl'])} ({pct(r['domain'].get('delta_pct'))})",
            f"{num(r['legal']['ppl'])} ({pct(r['legal'].get('delta_pct'))})",
            f"{num(r['stdlib']['ppl'])} ({pct(r['stdlib'].get('delta_pct'))})",
            num(r["domain"]["kl"], 3),
            num(r["legal"]["kl"], 3),
        ]

    rows = []
    for b, res in sorted(d["budgets"].items(), key=lambda kv: int(kv[0])):
        for key, r in res["rows"].items():
            if key != "dense" or not rows:
                rows.append([f"{int(b) // 1024}k", r.get("name", key), *cells(r)])
    head = ["budget", "model", "domain ppl (Δ)", "legal ppl (Δ)", "stdlib ppl (Δ)", "KL domain", "KL legal"]
    abl = d.get("ablation", {})
    abl_rows = [[name, *cells(r)] for name, r in abl.get("variants", {}).items()]
    body = (
        f"{d['model']}; graft: {d['graft']}; domain: {d['domain']}; retention: legal prose "
        f"({d['retention']['legal']}) and {d['retention']['stdlib']}.\n\n"
        + table(head, rows, right=range(2, 7))
        + f"\n\nAblation at {abl.get('budget', 0):,} tokens (same blocks):\n\n"
        + table(["variant", *head[2:]], abl_rows, right=range(1, 6))
    )
    return "Graft vs equal-size dense LoRA by budget (`bench_crossover.py`)", ["crossover.json"], body


def step_parts() -> tuple[str, list[str], str]:
    d = load("step_parts.json")
    ms, w = d["ms"], d["ffn_weights"]
    rows = []
    for phase in ("decode", "prefill"):
        dense_ffn = ms["dense"][phase]["step"] - ms["dense"][phase]["rest"]
        for model, parts in ms.items():
            ffn = parts[phase]["step"] - parts[phase]["rest"]
            rows.append(
                [
                    phase,
                    model,
                    num(parts[phase]["step"], 1),
                    num(ffn, 1),
                    ratio(parts[phase]["step"] / ms["dense"][phase]["step"]),
                    ratio(ffn / dense_ffn),
                    ratio(w[model] / w["dense"]),
                ]
            )
    gemv = d["gemv_gbps"]
    threads = list(gemv)
    gemv_rows = [[f"`{shape}`", *(num(gemv[t][shape], 1) for t in threads)] for shape in gemv[threads[0]]]
    body = (
        f"{d['model']}, {d['threads']} threads, min of {d['reps']} repetitions; decode at context {d['context']}, "
        f"prefill {d['prefill'][0]} × {d['prefill'][1]} tokens. FFN = the step minus the same step with every "
        "FFN block zeroed.\n\n"
        + table(
            ["phase", "model", "step ms", "FFN ms", "step ÷ dense", "FFN ÷ dense", "FFN weights ÷ dense"],
            rows,
            right=range(2, 7),
        )
        + "\n\nGEMV read rate (GB/s) by weight shape:\n\n"
        + table(["shape", *(f"{t} thread(s)" for t in threads)], gemv_rows, right=range(1, 1 + len(threads)))
    )
    return "Where a MoE step's time goes (`bench_step_parts.py`)", ["step_parts.json"], body


def experts() -> tuple[str, list[str], str]:
    d = load("experts.json")
    rows = []
    for model, phases in d["time_ratio"].items():
        for phase, impls in phases.items():
            rows.append([model, phase, ratio(d["flop_ratio"][model][phase]), *(num(impls[i]) for i in impls)])
    impls = list(next(iter(next(iter(d["time_ratio"].values())).values())))
    body = (
        f"{d['model']}, {d['threads']} threads, {d['reps']} repetitions; time ÷ dense time per experts "
        "implementation.\n\n"
        + table(
            ["model", "phase", "FLOPs ÷ dense", *(f"`{i}`" for i in impls)],
            rows,
            right=range(2, 3 + len(impls)),
        )
    )
    return "Experts implementations (`bench_experts.py`)", ["experts.json"], body


def eval_bench() -> tuple[str, list[str], str]:
    d = load("eval.json")
    b = d["bench"]
    rows = [
        [f"`{r['experts_impl']}`", r["batch"], num(r["prefill_time_ratio"]), num(r["decode_time_ratio"])]
        for r in b["time_ratios"] + d.get("bench_batched_mm", {}).get("time_ratios", [])
    ]
    a = d["args"]
    body = (
        f"SmolLM2-135M-Instruct → {a['experts']} × {a['expert_size']}, top-{a['top_k']}; {b['dtype']} on "
        f"{b['device']}, prompt {a['prompt_len']}, {a['new_tokens']} new tokens, {b['reps']} repetitions; FLOP "
        f"ratio {num(b['flop_ratio'])}. Time ÷ dense time (`batched_mm`: its own run, `bench_batched_mm`):\n\n"
        + table(["experts implementation", "batch", "prefill", "decode"], rows, right=[1, 2, 3])
    )
    return "`moegraft bench` against dense (`bench_eval.py`)", ["eval.json"], body


def llama_cpp() -> tuple[str, list[str], str]:
    q, t = load("llama_cpp_quant.json"), load("llama_cpp_timing.json")
    base = q["rows"]["graft f32"]["perplexity"]

    def types(r: dict) -> str:
        parts = []
        for group in ("experts", "rest"):
            if r["types"].get(group):
                parts.append(", ".join(f"{n} {k}" for k, n in r["types"][group].items()))
        return "; ".join(parts)

    rows = []
    for name, r in q["rows"].items():
        rows.append(
            [
                name,
                num(r["mb"], 1),
                num(r["perplexity"], 3),
                pct(100 * (r["perplexity"] / base - 1), 2) if r["model"] == "graft" else "",
                num(t["tok_s"][name]["decode_tok_s"], 1) if name in t["tok_s"] else "—",
                types(r),
            ]
        )
    eq = [
        f"- {name}: {num(v['experts_only_ppl'], 3)} vs uniform {num(v['uniform_ppl_at_size'], 3)} at the same "
        f"size: {'experts-only better' if v['experts_only_better'] else 'uniform better'}"
        for name, v in q["equal_size"].items()
    ]
    subs = sorted({s for r in q["rows"].values() for s in r["substitutions"]})
    dense = t["tok_s"]["dense f16"]
    speed = [
        [
            name,
            num(v["prefill_tok_s"], 1),
            num(v["decode_tok_s"], 1),
            num(v["prefill_tok_s"] / dense["prefill_tok_s"]),
            num(v["decode_tok_s"] / dense["decode_tok_s"]),
        ]
        for name, v in t["tok_s"].items()
    ]
    body = (
        f"llama.cpp (llama-cpp-python {q['llama_cpp_python']}): perplexity on {q['perplexity_tokens']:,} tokens "
        f"of `{q['perplexity_data']}` (blocks of {q['seq_len']}); decode tok/s from the timing file.\n\n"
        + table(
            ["GGUF", "MB", "perplexity", "Δ vs graft f32", "decode tok/s", "types written (experts; rest)"],
            rows,
            right=range(1, 5),
        )
        + "\n\nEqual size: each experts-only file vs the uniform files' perplexity interpolated at its size.\n\n"
        + "\n".join(eq)
        + "\n\nllama.cpp's substitutions (row lengths that do not fit the asked type):\n\n"
        + "\n".join(f"- {s}" for s in subs)
        + f"\n\nSpeed: batch 1, {t['threads']} threads, median of {t['rounds']} alternated rounds, "
        f"{t['prompt_tokens']}-token prompt, {t['decode_steps']} decode steps, KV cache {t['kv_cache']}.\n\n"
        + table(
            ["GGUF", "prefill tok/s", "decode tok/s", "prefill ÷ dense f16", "decode ÷ dense f16"],
            speed,
            right=range(1, 5),
        )
    )
    return (
        "Quantised GGUFs in llama.cpp (`bench_llama_cpp.py`)",
        ["llama_cpp_quant.json", "llama_cpp_timing.json"],
        body,
    )


def export() -> tuple[str, list[str], str]:
    d = load("export.json")
    rows = [
        [
            name,
            num(e["mb"], 1),
            e["tokens"],
            f"{e['max_abs_dlogit']:.3g}",
            f"{e['mean_abs_dlogit']:.3g}",
            f"{e['argmax_agreement']:.1%}",
            "yes" if e["greedy_identical"] else "no",
        ]
        for name, e in d["exports"].items()
    ]
    speed = [[name, num(v["median"], 2)] for name, v in d["decode_tokens_per_s"].items()]
    body = (
        f"{d['model']}, llama-cpp-python {d['llama_cpp_python']}, {d['threads']} threads; MoE: {d['moe']}.\n\n"
        + table(
            ["GGUF", "MB", "tokens", "max |Δlogit|", "mean |Δlogit|", "argmax agreement", "greedy identical"],
            rows,
            right=range(1, 6),
        )
        + f"\n\nDecode tokens/s (median of {d['decode']['rounds']}, {d['decode']['tokens']} tokens):\n\n"
        + table(["model / runtime", "tok/s"], speed, right=[1])
    )
    return "GGUF export checked against transformers (`bench_export.py`)", ["export.json"], body


def serving() -> tuple[str, list[str], str]:
    parts = []
    for name in ("serving.json", "serving_c16.json"):
        d = load(name)
        cells: dict[tuple[str, int], dict[str, dict]] = {}
        for r in d["summary"]:
            cells.setdefault((r["runtime"], r["concurrency"]), {})[r["model"]] = r
        rows = []
        for (runtime, conc), models in cells.items():
            dense = models["dense"]["output_tokens_per_s"]
            row = [runtime, conc]
            for m in ("dense", "graft", "carve"):
                tok = models[m]["output_tokens_per_s"]
                row.append(num(tok, 1) if m == "dense" else f"{num(tok, 1)} ({ratio(tok / dense)})")
            row.append(" / ".join(num(models[m]["itl_p50_s"] * 1000, 0) for m in ("dense", "graft", "carve")))
            row.append(
                " / ".join(
                    num(models[m]["server_peak_rss_mb"] / 1000, 1) for m in ("dense", "graft", "carve")
                )
            )
            rows.append(row)
        a = d["meta"]["args"]
        parts.append(
            f"`{name}`: {a['requests']} requests per level, {a['tokens']} output tokens, prompts of "
            f"{a['prompt_tokens']} tokens, {a['rounds']} round(s); {d['meta']['note']}.\n\n"
            + table(
                [
                    "runtime",
                    "concurrency",
                    "dense tok/s",
                    "graft",
                    "carve 50%",
                    "ITL p50 ms (d / g / c)",
                    "peak RSS GB (d / g / c)",
                ],
                rows,
                right=[1, 2, 3, 4],
            )
        )
    return (
        "Serving under concurrent load (`bench_serving.py`)",
        ["serving.json", "serving_c16.json"],
        "\n\n".join(parts),
    )


def fsdp_memory() -> tuple[str, list[str], str]:
    d = load("scale_fsdp_memory.json")
    rows = []
    for key, label in (("1_process", "1 process"), ("2_process", "2 FSDP processes")):
        for r in d[key]["ranks"]:
            ph = r["phases_gb"]
            rows.append(
                [
                    label,
                    r["rank"],
                    num(r["peak_rss_gb"]),
                    *(num(ph[p]["rss"]) for p in ("loaded", "prepared", "trained", "exit")),
                ]
            )
    body = (
        f"{d['model']}, {d['steps']} steps, sequences of {d['seq_len']}, global batch "
        f"{d['1_process']['global_batch']}. Note: {d['note']}.\n\n"
        + table(
            ["run", "rank", "peak RSS GB", "loaded", "prepared", "trained", "exit"], rows, right=range(1, 7)
        )
    )
    return "Peak RSS per process under FSDP (`bench_scale.py fsdp-memory`)", ["scale_fsdp_memory.json"], body


def convert_memory() -> tuple[str, list[str], str]:
    d = load("bench_convert_memory_pread.json")
    rows = []
    for s in d["sizes"]:
        m = s["summary"]
        rows.append(
            [
                f"{s['target_gb']:g} GB ({s['source']['layers']} layers, {s['source']['dtype']})",
                num(m["convert_s"], 1),
                num(m["cp_s"], 2),
                ratio(m["convert_over_cp"], 1),
                num(m["convert_max_rss"] / 1e9),
            ]
        )
    body = (
        f"Synthetic Llama-shaped sources, {d['spec']['num_experts']} × {d['spec']['expert_size']} top-"
        f"{d['spec']['top_k']}, init `{d['spec']['init']}`, {d['cpus']} CPUs; importing torch and transformers "
        f"alone: {num(d['import_baseline']['wall'], 1)} s, {num(d['import_baseline']['max_rss'] / 1e9)} GB.\n\n"
        + table(
            ["source", "convert s", "cp s", "convert ÷ cp", "convert peak RSS GB"], rows, right=range(1, 5)
        )
        + "\n\n"
        + "\n".join(f"- {n}" for n in d["notes"])
    )
    return "Conversion memory and time (`bench_convert_memory.py`)", ["bench_convert_memory_pread.json"], body


def mergekit() -> tuple[str, list[str], str]:
    parts = []
    for name in ("bench_mergekit.json", "bench_mergekit_rerun.json"):
        d = load(name)
        rows = []
        for tool, runs in d["runs"].items():
            c = d["check"][tool]
            rows.append(
                [
                    tool,
                    ", ".join(num(r["wall"], 1) for r in runs),
                    num(max(r["max_rss"] for r in runs) / 1e9),
                    c["class"],
                    num(c["max_abs_dlogit"], 1),
                    f"{c['argmax_agree']:.1%}",
                ]
            )
        parts.append(
            f"`{name}` (mergekit {d['mergekit_version']}, {d['experts']} upcycled experts, top-{d['top_k']}; "
            f"{d['check']['tokens']} tokens checked):\n\n"
            + table(
                ["tool", "wall s", "peak RSS GB", "class", "max |Δlogit|", "argmax agreement"],
                rows,
                right=[2, 4, 5],
            )
        )
    return (
        "Against mergekit-moe, SmolLM2 (`bench_mergekit.py`)",
        ["bench_mergekit.json", "bench_mergekit_rerun.json"],
        "\n\n".join(parts),
    )


def train_compile() -> tuple[str, list[str], str]:
    d = load("train_compile.json")
    runs = d["runs"]
    rows = [
        [
            "--compile" if r["compile"] else "eager",
            num(r["tokens_per_s"], 0),
            num(r["first_steps_extra_s"], 1),
            f"{max(r['losses']):.4f} … {min(r['losses']):.4f}",
        ]
        for r in runs
    ]
    body = (
        f"{d['model']}; {d['steps']} steps of {d['batch']} × {d['seq_len']} tokens, {d['threads']} threads, "
        f"torch {d['torch']}; tokens/s of the steps after the first {d['warmup']}, runs in the order shown.\n\n"
        + table(["run", "tokens/s", f"first {d['warmup']} steps' extra s", "loss range"], rows, right=[1, 2])
        + f"\n\nCompiled over eager, medians: {ratio(d['compiled_over_eager'])}. Compile: "
        f"{num(d['compile_s_cold'], 1)} s cold, none from inductor's disk cache. Losses step by step within "
        f"{d['max_rel_loss_diff']:.1e} relative. Load {num(d['load_before'][0])} before, "
        f"{num(d['load_after'][0])} after (its own two threads)."
    )
    return "`train --compile` on the CPU (`bench_train_compile.py`)", ["train_compile.json"], body


def train_vs_dense() -> tuple[str, list[str], str]:
    d = load("train_vs_dense.json")
    rows = [[r["model"], num(r["tokens_per_s"], 0), num(r["flops_per_token"] / 1e9, 3)] for r in d["runs"]]
    pairs = ", ".join(ratio(p) for p in d["pairs_graft_over_dense_step_time"])
    body = (
        f"{d['model']}, against full fine-tuning of the dense model (every weight, AdamW); {d['steps']} steps of "
        f"{d['batch']} × {d['seq_len']} tokens, {d['threads']} threads, torch {d['torch']}, fp32; runs in the order "
        "shown.\n\n"
        + table(["run", "tokens/s", "train GFLOP/token"], rows, right=[1, 2])
        + f"\n\nGraft step time over the dense full fine-tuning step, medians: "
        f"{ratio(d['graft_over_dense_step_time'])} (pairs {pairs}); the FLOPs predict {ratio(d['flops_ratio'])}. "
        f"Load {num(d['load_before'][0])} before, {num(d['load_after'][0])} after (its own two threads)."
    )
    return (
        "A graft step against dense full fine-tuning (`bench_train_vs_dense.py`)",
        ["train_vs_dense.json"],
        body,
    )


def next_token_loss() -> tuple[str, list[str], str]:
    d = load("next_token_loss.json")
    rows = [[k, num(v, 0)] for k, v in d["ms"].items()]
    body = (
        f"Forward + backward of the next-token loss on logits {tuple(d['shape'])}, {d['dtype']}, "
        f"{d['threads']} threads, torch {d['torch']}; median of {d['reps']} alternating runs.\n\n"
        + table(["loss", "ms"], rows, right=[1])
        + f"\n\nThe same loss: {d['loss_equal']}; gradient max |diff| {d['grad_max_abs_diff']:.1e}. "
        f"Load {num(d['load_before'][0])} before, {num(d['load_after'][0])} after."
    )
    return (
        "The next-token loss: shifted targets, not sliced logits (`bench_next_token_loss.py`)",
        ["next_token_loss.json"],
        body,
    )


def decode_ops() -> tuple[str, list[str], str]:
    d = load("decode_ops.json")
    rows = [
        [
            r["model"],
            r["experts_impl"] or "—",
            r["kernel_ops"],
            f"{r['per_layer_over_dense']:+.1f}",
            r["host_reads"],
        ]
        for r in d["rows"]
    ]
    body = (
        f"One cached decode step, batch 1, a random {d['layers']}-layer Llama and its graft and carve; aten ops "
        f"that launch a kernel (views left out), torch {d['torch']}. `moegraft` is its CPU path; on CUDA it runs "
        "`grouped_mm`.\n\n"
        + table(
            ["model", "experts impl", "kernel ops", "per layer over dense", "host reads"],
            rows,
            right=[2, 3, 4],
        )
    )
    return "Kernels per decode step (`bench_decode_ops.py`)", ["decode_ops.json"], body


SECTIONS: list[Callable[[], tuple[str, list[str], str]]] = [
    router,
    router_compare,
    router_timing,
    train,
    train_compile,
    train_vs_dense,
    next_token_loss,
    carve_training_free,
    cmoe,
    cmoe_recovery,
    carve_recovery,
    carve_curve,
    crossover,
    step_parts,
    decode_ops,
    experts,
    eval_bench,
    llama_cpp,
    export,
    serving,
    fsdp_memory,
    convert_memory,
    mergekit,
]


def render() -> str:
    out = [
        "# Measured",
        "",
        "<!-- generated by docs/gen_measured.py from benchmarks/results/*.json: do not edit by hand -->",
        "",
        "Every table on this page is generated by [`docs/gen_measured.py`](gen_measured.py) from the JSON a "
        "benchmark script in `benchmarks/` wrote; each section names its file. Timings were taken on 2 CPU "
        "cores, most of them shared with other jobs; ratios were measured A/B-alternated in one run. What the "
        "numbers mean, and the claims they support, are on [Claims](claims.md) and on each command's page.",
        "",
    ]
    for section in SECTIONS:
        title, files, body = section()
        out += [f"## {title}", "", body, "", source(*files), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/measured.md is out of date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(
                f"{PAGE.relative_to(ROOT)} is out of date: run python docs/gen_measured.py", file=sys.stderr
            )
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
