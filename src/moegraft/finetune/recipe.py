"""The finetune recipe: PEFT LoRA adapters placed by the format's pathway map (the PathwayLora preparation),
trained by `moegraft train`'s recipe, with two more named steps: OUT's spec file, and the merge.

In: a MoE checkpoint (from convert, train, or a merged finetune) and a FinetuneSpec. Out: OUT/model (a PEFT
adapter in safetensors, with the tokenizer), with --merge OUT/merged (a native checkpoint), `moegraft-finetune.json`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moegraft.errors import SpecError
from moegraft.finetune.adapters import (
    LoraTargets,
    PathwayLora,
    PathwayLoraFacts,
    lora_targets,
    restrict_experts,
    routing_counts,
    select_experts,
)
from moegraft.finetune.spec import FINETUNE_FILE, FinetuneSpec, Stage
from moegraft.io.atomic import atomic_output_dir
from moegraft.io.source import checkpoint_dtype
from moegraft.models import ADAPTER_CONFIG, load_adapter, peft_calls
from moegraft.train.loop import TrainRecipe, TrainResult
from moegraft.train.spec import TrainSpec, read_saved_spec, write_spec_file
from moegraft.train.state import Fitted, Processes, RunState
from moegraft.train.strategies import Prepared

__all__ = [
    "FINETUNE_FILE",
    "FinetuneRecipe",
    "FinetuneResult",
    "FinetuneSpec",
    "LoraTargets",
    "Stage",
    "finetune",
    "load_adapter",
    "lora_targets",
    "merge_adapter",
    "restrict_experts",
    "routing_counts",
    "select_experts",
]


@dataclass(frozen=True)
class FinetuneResult:
    train: TrainResult  # steps, tokens, held-out loss/perplexity, trainable parameters, time
    adapter_dir: Path  # OUT/model: adapter_config.json, adapter_model.safetensors, tokenizer
    merged_dir: Path | None  # OUT/merged with --merge
    targets: LoraTargets
    experts: dict[int, list[int]] | None  # the experts trained per layer (None: all)


class FinetuneRecipe(TrainRecipe):
    """`moegraft train`'s recipe given the PathwayLora preparation; OUT/model is the adapter (with
    `moegraft-finetune.json`), and `finish` also merges it into OUT/merged with --merge."""

    def __init__(self, moe_dir: str | Path, out: str | Path, spec: FinetuneSpec, **kwargs):
        super().__init__(moe_dir, out, spec.train, preparation=PathwayLora(spec), **kwargs)
        self.lora = spec

    def record_run(
        self, run_dir: Path, spec: TrainSpec, resolved: dict, procs: Processes, prepared: Prepared
    ) -> None:
        """`moegraft-finetune.json` (the LoRA flags and what they resolved to) beside the train recipe's record."""
        if procs.main and not self.resume:
            facts: PathwayLoraFacts = prepared.facts
            run_dir.mkdir(parents=True, exist_ok=True)
            write_spec_file(run_dir / FINETUNE_FILE, self.moe_dir, self.lora, facts.record())
        super().record_run(run_dir, spec, resolved, procs, prepared)

    def save_model(
        self, state: RunState, tmp: Path, state_dict: dict[str, torch.Tensor], result: TrainResult
    ) -> None:
        super().save_model(state, tmp, state_dict, result)
        shutil.copy2(state.run_dir / FINETUNE_FILE, tmp / FINETUNE_FILE)

    def finish(self, state: RunState, fitted: Fitted, t_start: float) -> TrainResult:
        result = super().finish(state, fitted, t_start)
        if self.lora.merge and state.procs.main:
            merge_adapter(result.model_dir, state.run_dir / "merged", overwrite=True)
        state.procs.accelerator.wait_for_everyone()
        return result

    def outcome(self, state: RunState, result: TrainResult) -> FinetuneResult:
        facts: PathwayLoraFacts = state.adapted
        merged = (
            self.out / "merged" if self.lora.merge and state.procs.main else None
        )  # the main process wrote it
        return FinetuneResult(result, result.model_dir, merged, facts.targets, facts.experts)


def finetune(
    moe_dir: str | Path,
    out: str | Path,
    spec: FinetuneSpec,
    *,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    callback=None,
) -> FinetuneResult:
    """LoRA-fine-tune the chosen pathways of a MoE checkpoint with `moegraft train`'s recipe.

    Args:
        moe_dir: a native MoE directory (from convert, train, or `finetune --merge`).
        out: run directory: spec files, metrics.jsonl, checkpoints/, model/ (the adapter), merged/.
        spec: stages, LoRA shape, experts, and the training run.
        progress, resume, overwrite, callback: as for `moegraft.train.train`.

    Returns:
        The training result, where the adapter (and merged model) went, and what was adapted.
    """
    moe_dir, out = Path(moe_dir), Path(out)
    if (moe_dir / ADAPTER_CONFIG).is_file():
        raise SpecError(
            f"{moe_dir} is a LoRA adapter; fine-tune on top of the merged model (finetune --merge writes OUT/merged)"
        )
    if resume:
        old = read_saved_spec(out / FINETUNE_FILE, FinetuneSpec)
        if old.model_dump(exclude={"train", "merge"}) != spec.model_dump(exclude={"train", "merge"}):
            raise SpecError("--resume: the LoRA flags differ from the saved run's; use the same flags")
    recipe = FinetuneRecipe(
        moe_dir, out, spec, progress=progress, resume=resume, overwrite=overwrite, callback=callback
    )
    return recipe.run()


def merge_adapter(adapter_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write base + adapter as one native checkpoint (loads with AutoModelForCausalLM), atomically.

    The merge runs in fp32 and is written in the base checkpoint's dtype (a bf16 base gives a bf16 model).
    """
    adapter_dir = Path(adapter_dir)
    model, tok = load_adapter(adapter_dir)
    base = Path(json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])
    if (base / "config.json").is_file():
        model.to(checkpoint_dtype(base))
    with atomic_output_dir(out, overwrite=overwrite) as tmp, peft_calls():
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        for name in ("moegraft.json", FINETUNE_FILE):
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, tmp / name)
    return Path(out)
