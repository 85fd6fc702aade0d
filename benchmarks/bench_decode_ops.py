"""Kernels a decode step launches: aten ops per token of a dense model, its graft and its carve, per experts
implementation, counted on the CPU (the same ops a GPU launches as kernels, each with its launch overhead).

At batch 1 a small model's decode step on a GPU is likely bound by kernel launches rather than FLOPs: the MoE
block's router, sort, grouped matmuls, shared expert and gate launch more kernels than the dense MLP's few,
whatever their size. This counts them, so that the eager GPU time ratios (issue 26: carve 1.9x dense) can be read
against a number; `bench --compile` (one CUDA graph per step) is what would remove their launch cost. Counted with
a TorchDispatchMode over one cached decode step (batch 1, after a 16-token prompt) of a random 4-layer Llama
(hidden 256, intermediate 1024) converted by moegraft (graft: 8 x 128, top-2, zero init, random router; carve:
512 shared + 2 of 8 x 64, fitted to random calibration tokens). Ops that only make views (view, reshape,
transpose, slice, ...) launch no kernel and are left out. "host reads" are the ops that make a GPU wait for the
host (.item(), .tolist(), nonzero); a .tolist() also counts as a kernel op (on a GPU, a copy to the host).
"moegraft" is its CPU path here (picks: two matmuls per chosen expert, read with .tolist()); on a GPU it runs
transformers' grouped_mm, the grouped_mm row. A few ops differ on CUDA (grouped_mm casts histc's input to float on
the CPU, to int on CUDA; attention may dispatch another SDPA kernel): the counts are the CPU's.

Usage:
    python benchmarks/bench_decode_ops.py
Writes benchmarks/results/decode_ops.json and prints a table. Deterministic: op counts, not times.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.eval.experts import experts_impls, set_experts_impl
from moegraft.models import cached_forward, load_causal_lm

HERE = Path(__file__).resolve().parent
LAYERS = 4
VIEWS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice",
    "select", "alias", "detach", "as_strided", "split", "split_with_sizes", "chunk", "unbind", "narrow",
    "lift_fresh", "_reshape_alias", "unflatten", "flatten", "view_as", "expand_as", "contiguous", "sym_size",
    "sym_stride", "sym_numel", "is_same_size", "dim", "size", "stride",
}  # fmt: skip
HOST_READS = {"_local_scalar_dense", "nonzero", "item", "tolist"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def decode_ops(model, prompt: torch.Tensor) -> Counter[str]:
    with torch.no_grad():
        logits, cache = cached_forward(model, prompt)
        step = logits[:, -1:].argmax(-1)  # (1, 1)
        counter = OpCounter()
        tolist = torch.Tensor.tolist

        def counted_tolist(t):  # on the CPU .tolist() reads memory without an aten op; on a GPU it syncs
            counter.ops["tolist"] += 1
            return tolist(t)

        torch.Tensor.tolist = counted_tolist
        try:
            with counter:
                cached_forward(model, step, cache)
        finally:
            torch.Tensor.tolist = tolist
    return counter.ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=HERE / "results" / "decode_ops.json")
    args = ap.parse_args()
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=LAYERS, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    prompt = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))  # (1, T)
    calib = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(1))  # (N, T)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dense_dir = Path(tmp) / "dense"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(dense_dir)
        specs = {
            "graft": GraftSpec(num_experts=8, top_k=2, expert_size=128, init="zero", router_init="random"),
            "carve": GraftSpec(init="carve", num_experts=8, top_k=2, shared_size=512),
        }
        dirs = {"dense": dense_dir}
        for name, spec in specs.items():
            dirs[name] = convert(
                str(dense_dir), Path(tmp) / name, spec, progress=False, calib_blocks=calib
            ).out
        for name, d in dirs.items():
            model, _ = load_causal_lm(str(d), with_tokenizer=False)
            for impl in experts_impls(model) if name != "dense" else [None]:
                if impl is not None:
                    set_experts_impl(model, impl)
                ops = decode_ops(model, prompt)
                kernels = sum(n for op, n in ops.items() if op not in VIEWS)
                rows.append(
                    {
                        "model": name,
                        "experts_impl": impl,
                        "kernel_ops": kernels,
                        "host_reads": sum(n for op, n in ops.items() if op in HOST_READS),
                        "ops": dict(sorted(ops.items())),
                    }
                )
    dense = rows[0]["kernel_ops"]
    for r in rows:
        r["per_layer_over_dense"] = (r["kernel_ops"] - dense) / LAYERS
    print(f"one decode step, batch 1, {LAYERS} layers; dense: {dense} kernel ops\n")
    print("| model | experts impl | kernel ops | per layer over dense | host reads |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['experts_impl'] or '—'} | {r['kernel_ops']} | {r['per_layer_over_dense']:+.1f} "
            f"| {r['host_reads']} |"
        )
    doc = {"layers": LAYERS, "torch": torch.__version__, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
