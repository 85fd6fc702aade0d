"""The equal-budget comparison recipe: the graft against a dense LoRA of the same trainable size, same data and steps.

In: DENSE (HF directory or .gguf), MOE_DIR (its `moegraft convert` output), one TrainSpec. Out: OUT/graft and
OUT/lora (two runs of `moegraft train`'s recipe, the LoRA's given the DenseLora preparation), OUT/compare.json,
compare.md, compare.png (moegraft.eval.compare_report), and a CompareResult. Steps: train both → score → cost →
write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moegraft.errors import CompareError
from moegraft.eval.compare_report import (
    COMPARE_FILE,
    ROWS,
    CompareResult,
    Row,
    plot_deltas,
    score_row,
    write_comparison,
)
from moegraft.finetune.adapters import DenseLora, LoraSize, lora_rank, lora_size
from moegraft.io.writer import atomic_output_dir, check_output
from moegraft.models import load_adapter, load_causal_lm
from moegraft.train.loop import TrainRecipe, TrainResult, train
from moegraft.train.spec import SPEC_FILE, TrainSpec, read_meta

__all__ = [
    "COMPARE_FILE",
    "ROWS",
    "CompareError",
    "CompareResult",
    "Row",
    "compare",
    "lora_rank",
    "lora_size",
    "plot_deltas",
]


@dataclass(frozen=True)
class Trained:
    """The two training runs of the comparison."""

    graft: TrainResult
    lora: TrainResult
    size: LoraSize  # the rank DenseLora chose for the graft's trainable count
    notes: list[str]


@dataclass(frozen=True)
class Scored:
    """The three models' EvalResults on the same domain and retention blocks."""

    evals: dict  # "dense" | "graft" | "lora" → EvalResult (domain metrics + .retain)
    domain_blocks: int
    retain_blocks: int
    notes: list[str]


def compare(
    dense: str | Path,
    moe_dir: str | Path,
    out: str | Path,
    spec: TrainSpec,
    *,
    lora_lr: float = 1e-3,
    retain_data: str = "stdlib:heldout",
    report_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    callback: Callable[[str, dict], None] | None = None,
) -> CompareResult:
    """Train the graft and a dense LoRA of the same trainable size on the same blocks, then score all three.

    Args:
        dense: the dense model MOE_DIR was converted from (HF directory or .gguf file).
        moe_dir: its `moegraft convert` output.
        out: OUT (must not exist unless `overwrite`): graft/, lora/ (train runs), compare.json/.md/.png.
        spec: the training run for both; the LoRA's copy takes `lora_lr` and drops the balance terms (no router).
        lora_lr: the LoRA's peak learning rate (LoRA factors want a different lr than fresh experts).
        retain_data: other text, evaluated on the same blocks for all three: shows forgetting.
        report_dir: also write each model's `moegraft eval` report to REPORT/{dense,graft,lora}.
        progress: live bars of both training runs.
        overwrite: replace an existing OUT (and REPORT).
        callback: `callback(run, row)` after each optimizer step of run "graft" or "lora" (tests, notebooks).

    Returns:
        The three rows (perplexities, deltas, trainable parameters, time, cost) and what made them comparable.

    Raises:
        CompareError, SpecError, SourceError, OutputExistsError (all MoegraftError).
    """
    out, moe_dir = Path(out), Path(moe_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CompareError("compare runs in one process; for several GPUs run `moegraft train` per model")
    check_output(out, overwrite)
    if report_dir is not None:
        check_output(Path(report_dir), overwrite)
    spec = spec.for_checkpoint(read_meta(moe_dir))  # what the graft's run will train, at which lr
    lora_train = lora_spec(spec, lora_lr)
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_output_dir(out, overwrite=overwrite))
        rtmp = None if report_dir is None else stack.enter_context(atomic_output_dir(report_dir, overwrite))
        trained = train_both(dense, moe_dir, tmp, spec, lora_train, progress=progress, callback=callback)
        scored = score(dense, out, trained, spec, retain_data, rtmp)
        rows, cost_notes = cost_rows(dense, moe_dir, trained, scored, spec.seq_len)
        saved = json.loads((tmp / "graft" / SPEC_FILE).read_text())["resolved"]
        result = CompareResult(
            dense=str(dense),
            moe_dir=str(moe_dir),
            out=out,
            rows=rows,
            lora_rank=trained.size.rank,
            lora_params_per_rank=trained.size.per_rank,
            lora_lr=lora_lr,
            steps=trained.graft.steps,
            tokens=trained.graft.tokens,
            seq_len=spec.seq_len,
            domain="the held-out tail of --data"
            if spec.eval_data is None
            else f"--eval-data `{spec.eval_data}`",
            domain_blocks=scored.domain_blocks,
            retain=retain_data,
            retain_blocks=scored.retain_blocks,
            train_blocks_sha256=saved["train_blocks_sha256"],
            spec=spec.model_dump(),
            notes=trained.notes + scored.notes + cost_notes,
        )
        write_comparison(result, tmp, *([] if rtmp is None else [rtmp]))
    return result


def lora_spec(spec: TrainSpec, lora_lr: float) -> TrainSpec:
    """The graft's run but for what a router-less model cannot have; `trainable` records what all-linear adapts."""
    return TrainSpec.build(
        **{
            **spec.model_dump(),
            "lr": lora_lr,
            "balance": "none",
            "aux_coef": 0.0,
            "z_coef": 0.0,
            "trainable": ("attention", "dense"),
        }
    )


def train_both(
    dense: str | Path,
    moe_dir: Path,
    tmp: Path,
    spec: TrainSpec,
    lora_train: TrainSpec,
    *,
    progress: bool,
    callback: Callable[[str, dict], None] | None,
) -> Trained:
    """(a) the graft, exactly as `moegraft train` runs it; (b) the dense LoRA, sized to the graft's trainable
    count, through the same recipe and data. Raises CompareError unless both saw the same blocks."""

    def on_step(run: str):
        return None if callback is None else (lambda row: callback(run, row))

    graft = train(moe_dir, tmp / "graft", spec, progress=progress, callback=on_step("graft"))
    dense_src = Path(dense).expanduser()
    base_name = str(dense_src.resolve()) if dense_src.exists() else str(dense)
    preparation = DenseLora(target=graft.trainable_params, base_name=base_name)
    lora = TrainRecipe(
        dense,
        tmp / "lora",
        lora_train,
        preparation=preparation,
        progress=progress,
        callback=on_step("lora"),
    ).run()
    _check_same_data(tmp / "graft", tmp / "lora")
    size: LoraSize = lora.adapted
    notes = []
    if size.rank > size.smallest:
        notes.append(
            f"LoRA rank {size.rank} exceeds the smallest linear dimension {size.smallest}: those "
            "adapters have more factors than their matrix has rank"
        )
    return Trained(graft, lora, size, notes)


def score(
    dense: str | Path, out: Path, trained: Trained, spec: TrainSpec, retain_data: str, rtmp: Path | None
) -> Scored:
    """The three models on the same blocks: the held-out blocks train() scored, and the retention set."""
    from moegraft.eval.evaluate import evaluate, token_blocks

    notes = []
    domain = trained.graft.eval_blocks  # (N, T), or (N, 2, T) with a loss mask
    if domain.dim() == 3:
        domain = domain[:, 0]  # (N, T) the ids
        notes.append("--loss-mask assistant: perplexities here count every token, not only the assistant's")
    device = _eval_device(spec)
    dense_model, tok = load_causal_lm(dense, device=device)
    T = spec.seq_len
    if spec.data.startswith("stdlib:") and retain_data.startswith("stdlib:"):
        notes.append(
            f"--data {spec.data} and --retain-data {retain_data} are both stdlib docstring prose: retention "
            "here is held-out generalisation on the same kind of text, not forgetting of other text"
        )
    retain = token_blocks(retain_data, tok, seq_len=T, max_tokens=spec.eval_blocks * T)  # (N', T)
    budget = max(len(domain), len(retain)) * T

    def run(model: nn.Module, name: str, baseline: nn.Module | None):
        return evaluate(
            model,
            baseline=baseline,
            data=domain,
            retain_data=retain,
            max_tokens=budget,
            seq_len=T,
            batch_size=spec.batch,
            device=device,
            report_dir=None if rtmp is None else rtmp / name,
        )

    evals = {"dense": run(dense_model, "dense", None)}
    graft_model, _ = load_causal_lm(trained.graft.model_dir, device=device, with_tokenizer=False)
    graft_model.name_or_path = str(out / "graft" / "model")  # where it will be, not the temporary
    evals["graft"] = run(graft_model, "graft", dense_model)
    del graft_model
    lora_model, _ = load_adapter(trained.lora.model_dir, device=device, with_tokenizer=False)  # merged
    lora_model.name_or_path = f"{dense} + LoRA {out / 'lora' / 'model'} (merged)"
    evals["lora"] = run(lora_model, "lora", dense_model)
    del lora_model, dense_model
    return Scored(evals, len(domain), len(retain), notes)


def cost_rows(
    dense: str | Path, moe_dir: Path, trained: Trained, scored: Scored, T: int
) -> tuple[tuple[Row, Row, Row], list[str]]:
    """The dense, graft and LoRA rows: scores, and cost per token from config.json alone (plan's accounting) at
    the training context T; with the notes on how to read them."""
    from moegraft.io.source import read_config
    from moegraft.plan import plan

    dense_cost = plan(read_config(str(dense)), context=T).dense
    graft_cost = plan(read_config(str(moe_dir)), context=T).dense  # the MoE as it is
    graft, lora, evals = trained.graft, trained.lora, scored.evals
    unmerged = (dense_cost.flops_per_token + 2 * lora.trainable_params) / dense_cost.flops_per_token
    notes = [
        "the LoRA merged into the dense weights costs what the dense model costs; unmerged, its adapters add "
        f"2 × {lora.trainable_params:,} FLOPs/token (x{unmerged:.3f} vs dense)",
        f"active params and FLOPs/token from `moegraft plan` at context {T}; train s = the training loop alone "
        "(loading, evaluation and saving excluded)",
        "Δ vs dense = perplexity / dense perplexity − 1; the dense FFN of the graft is frozen and always on, "
        "the LoRA changes the dense weights themselves",
    ]
    dense_ev = evals["dense"]
    rows = (
        score_row("dense", dense_ev, dense_ev, 0, None, dense_cost, dense_cost),
        score_row(
            "graft",
            evals["graft"],
            dense_ev,
            graft.trainable_params,
            graft.train_seconds,
            graft_cost,
            dense_cost,
        ),
        score_row(
            f"LoRA r={trained.size.rank}",
            evals["lora"],
            dense_ev,
            lora.trainable_params,
            lora.train_seconds,
            dense_cost,
            dense_cost,
        ),
    )
    return rows, notes


def _eval_device(spec: TrainSpec) -> str:
    if spec.device != "auto":
        return spec.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_same_data(*runs: Path) -> None:
    """Raise CompareError unless the runs' saved specs record the same train/eval blocks, seed and batches."""
    keys = ("train_blocks_sha256", "eval_blocks_sha256", "steps", "global_batch", "tokens_per_step")
    docs = [json.loads((run / SPEC_FILE).read_text()) for run in runs]
    first = docs[0]
    for run, doc in zip(runs[1:], docs[1:], strict=True):
        diff = [k for k in keys if doc["resolved"][k] != first["resolved"][k]]
        if doc["spec"]["seed"] != first["spec"]["seed"]:
            diff.append("seed")
        if diff:
            raise CompareError(
                f"the graft and the LoRA runs differ in {', '.join(diff)} ({run.name}): DENSE and MOE_DIR must "
                "share a tokenizer, so that both train on the same token blocks"
            )
