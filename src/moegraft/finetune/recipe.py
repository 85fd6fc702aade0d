"""The finetune recipe: PEFT LoRA adapters placed by the format's pathway map, trained by `moegraft train`'s
recipe (FinetuneRecipe is a TrainRecipe whose `prepare_model` wraps the model).

In: a MoE checkpoint (from convert, train, or a merged finetune) and a FinetuneSpec. Out: OUT/model (a PEFT
adapter in safetensors, with the tokenizer), with --merge OUT/merged (a native checkpoint), `moegraft-finetune.json`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from torch import nn

from moegraft.data import pack, read_texts
from moegraft.errors import SourceError, SpecError
from moegraft.io.atomic import atomic_output_dir
from moegraft.io.source import checkpoint_dtype
from moegraft.models import ADAPTER_CONFIG, load_adapter, parameters_by_pathway, peft_calls
from moegraft.routing import RouterTap, expert_counts
from moegraft.train.loop import TrainRecipe, TrainResult
from moegraft.train.spec import TrainSpec, read_saved_spec, write_spec_file

Stage = Literal["dense", "experts", "router", "attention"]
FINETUNE_FILE = "moegraft-finetune.json"
ADAPTER = "default"  # PEFT's adapter name
# all | top-used:N | top-used:N@report.json (from `moegraft eval --report`) | expert ids like 0,3,5
_SELECT = re.compile(r"^(?:all|top-used:(?P<n>\d+)(?:@(?P<report>.+))?|(?P<ids>\d+(?:,\d+)*))$")
_LAYER = re.compile(r"layers\.(\d+)\.")


class FinetuneSpec(BaseModel):
    """Which pathways get LoRA adapters, their shape, which experts, and the training run (a TrainSpec)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: tuple[Stage, ...]
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05  # on the LoRA inputs of nn.Linear targets (PEFT allows none on bare parameters)
    experts_select: str = "all"
    count_blocks: int = 16  # blocks of the training data whose routing ranks the experts for top-used:N
    merge: bool = False
    train: TrainSpec

    @model_validator(mode="after")
    def _check(self) -> FinetuneSpec:
        if not self.stages:
            raise ValueError("--stage is empty; name at least one of dense,experts,router,attention")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"--stage {','.join(self.stages)}: a stage is named twice")
        for name in ("rank", "count_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.alpha <= 0:
            raise ValueError(f"--alpha must be > 0 (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if not _SELECT.match(self.experts_select):
            raise ValueError(
                f"--experts-select {self.experts_select!r}: use all, top-used:N, top-used:N@report.json or ids like 0,3"
            )
        if self.experts_select != "all" and "experts" not in self.stages:
            raise ValueError("--experts-select needs the experts stage (--stage experts)")
        if self.train.balance == "bias":
            # the selection bias is a buffer, updated outside the optimizer; an adapter holds LoRA factors only
            raise ValueError(
                "--balance bias: a LoRA adapter cannot carry the selection bias; use --balance aux"
            )
        m = _SELECT.match(self.experts_select)
        if m["n"] is not None and int(m["n"]) < 1:
            raise ValueError("--experts-select top-used:N needs N >= 1")
        return self

    @classmethod
    def build(
        cls,
        *,
        stages: str | tuple[str, ...],
        rank: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        experts_select: str = "all",
        merge: bool = False,
        **train_kwargs,
    ) -> FinetuneSpec:
        """A spec from flags; `train_kwargs` are TrainSpec fields. Errors become one SpecError line.

        Balance losses (aux, z) only apply when the router is a stage: otherwise their gradient would reach the
        dense and attention adapters through the hidden states and bend them towards balancing a frozen router.
        """
        if isinstance(stages, str):
            stages = tuple(s.strip() for s in stages.split(",") if s.strip())
        if "router" not in stages:
            train_kwargs.update(balance="none", z_coef=0.0)
        train_kwargs.setdefault("loss_mask", "assistant")
        train_kwargs["trainable"] = tuple(
            stages
        )  # recorded; `finetune` trains LoRA factors, not these pathways
        train_spec = TrainSpec.build(**train_kwargs)
        try:
            return cls(
                stages=stages,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                experts_select=experts_select,
                merge=merge,
                train=train_spec,
            )
        except ValidationError as e:
            err = e.errors()[0]
            raise SpecError(str(err.get("ctx", {}).get("error", err["msg"]))) from None


@dataclass(frozen=True)
class LoraTargets:
    """Where the adapters go, derived from the format's pathway map (so stage names work for every format)."""

    modules: tuple[str, ...]  # nn.Linear modules: PEFT `target_modules`
    parameters: tuple[
        str, ...
    ]  # bare weights (fused (E, out, in) experts, (E, H) routers): `target_parameters`
    experts: tuple[str, ...]  # the routed experts' fused tensors among `parameters`
    frozen: tuple[str, ...]  # parameters of the stages that LoRA cannot adapt (1-D norms and scales)


def lora_targets(model: nn.Module, stages: tuple[str, ...]) -> LoraTargets:
    """The LoRA targets of these stages (pathways) in a loaded native MoE model (not yet PEFT-wrapped)."""
    by_pathway = parameters_by_pathway(model)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    mods: set[str] = set()
    bare: set[str] = set()
    experts: set[str] = set()
    frozen: list[str] = []
    for stage in stages:
        for name in by_pathway[stage]:
            owner = name.rpartition(".")[0]
            if isinstance(modules[owner], nn.Linear):
                mods.add(owner)  # its weight and bias both belong to it
            elif params[name].ndim >= 2:
                bare.add(name)
                if stage == "experts":
                    experts.add(name)
            else:
                frozen.append(name)
    return LoraTargets(tuple(sorted(mods)), tuple(sorted(bare)), tuple(sorted(experts)), tuple(frozen))


@torch.no_grad()
def routing_counts(model: nn.Module, blocks: torch.Tensor, batch: int) -> dict[int, torch.Tensor]:
    """Layer → (E,) (token, slot) assignments per expert of `model` on blocks (N, T)."""
    counts: dict[int, torch.Tensor] = {}
    with RouterTap(model, detach=True) as tap:
        for i in range(0, len(blocks), batch):
            tap.clear()
            model(input_ids=blocks[i : i + batch], use_cache=False)
            for layer, recs in tap.records.items():
                c = expert_counts(recs[-1].indices, recs[-1].logits.shape[-1])  # (E,)
                counts[layer] = counts[layer] + c if layer in counts else c
    return counts


def select_experts(
    select: str, model: nn.Module, tok, spec: FinetuneSpec, targets: LoraTargets
) -> dict[int, list[int]] | None:
    """Layer → the expert ids whose LoRA factors train (None: all experts)."""
    if select == "all":
        return None
    m = _SELECT.match(select)  # FinetuneSpec validated it
    layers = sorted({int(_LAYER.search(n)[1]) for n in targets.experts})
    E = dict(model.named_parameters())[targets.experts[0]].shape[0]
    if m["ids"] is not None:
        ids = sorted({int(i) for i in m["ids"].split(",")})
        if ids[-1] >= E:
            raise SpecError(f"--experts-select {select}: expert {ids[-1]} does not exist (the model has {E})")
        return {layer: ids for layer in layers}
    n = min(int(m["n"]), E)
    if m["report"] is None and next(model.parameters()).is_meta:
        raise SpecError(
            f"--experts-select {select}: counting the routing needs the weights on every process; set "
            "fsdp_cpu_ram_efficient_loading: false, or pass top-used:N@report.json from `moegraft eval --report`"
        )
    if m["report"] is not None:
        path = Path(m["report"]).expanduser()
        if not path.is_file():
            raise SourceError(f"--experts-select {select}: no such report {path}")
        routing = json.loads(path.read_text()).get("routing") or []
        load = {r["layer"]: torch.tensor(r["fractions"]) for r in routing}
    else:
        t = spec.train
        blocks = pack(
            read_texts(t.data, tokenizer=tok), tok, t.seq_len, max_blocks=spec.count_blocks
        )  # (N, T)
        load = {k: v.double() for k, v in routing_counts(model, blocks, t.batch).items()}
    missing = [layer for layer in layers if layer not in load or len(load[layer]) != E]
    if missing:
        raise SpecError(f"--experts-select {select}: no load statistics of {E} experts for layers {missing}")
    return {layer: sorted(torch.topk(load[layer], n).indices.tolist()) for layer in layers}


def restrict_experts(model: nn.Module, targets: LoraTargets, chosen: dict[int, list[int]]) -> int:
    """Mask the gradient of the expert LoRA factors so only the chosen experts of each layer learn.

    PEFT's 3-D LoRA keeps one (A, B) pair per expert inside two matrices; the other experts' B stays at its zero
    init, so their weights do not change (their A does not matter). Returns the number of trainable entries.
    """
    from peft.tuners.lora.layer import ParamWrapper

    live = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, ParamWrapper):
            continue
        full = f"{_unwrapped(name)}.{mod.parameter_name}"
        if full not in targets.experts:
            continue
        E, r = mod.num_experts, mod.r[ADAPTER]
        keep = torch.zeros(E)
        keep[chosen.get(int(_LAYER.search(full)[1]), [])] = 1.0
        # PEFT's reshapes: lora_A (E·r, in) is expert-major (row e·r + j is expert e's), lora_B (out, r·E) is
        # expert-minor (column j·E + e is expert e's)
        a_rows = keep.repeat_interleave(r)  # (E·r,)
        b_cols = keep.repeat(r)  # (r·E,)
        A, B = mod.lora_A[ADAPTER].weight, mod.lora_B[ADAPTER].weight
        A.register_hook(lambda g, m=a_rows: g * m.to(g)[:, None])
        B.register_hook(lambda g, m=b_cols: g * m.to(g)[None, :])
        live += int(a_rows.sum()) * A.shape[1] + int(b_cols.sum()) * B.shape[0]
    return live


def _unwrapped(name: str) -> str:
    """A PEFT module name as the base model calls it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


@dataclass(frozen=True)
class FinetuneResult:
    train: TrainResult  # steps, tokens, held-out loss/perplexity, trainable parameters, time
    adapter_dir: Path  # OUT/model: adapter_config.json, adapter_model.safetensors, tokenizer
    merged_dir: Path | None  # OUT/merged with --merge
    targets: LoraTargets
    experts: dict[int, list[int]] | None  # the experts trained per layer (None: all)


class FinetuneRecipe(TrainRecipe):
    """`moegraft train`'s recipe with the model wrapped in LoRA adapters placed by the spec's stages; OUT/model
    is the adapter (with `moegraft-finetune.json`), and `finish` also merges it into OUT/merged with --merge."""

    adapter = True

    def __init__(self, moe_dir: str | Path, out: str | Path, spec: FinetuneSpec, **kwargs):
        super().__init__(moe_dir, out, spec.train, **kwargs)
        self.lora = spec
        self.targets: LoraTargets | None = None
        self.experts: dict[int, list[int]] | None = None

    def prepare_model(self, model: nn.Module, tok) -> nn.Module:
        """The model wrapped in PEFT LoRA adapters on the stages' matrices, only the chosen experts' learning."""
        from peft import LoraConfig, get_peft_model

        spec = self.lora
        targets = lora_targets(model, spec.stages)
        if not targets.modules and not targets.parameters:
            raise SpecError(f"--stage {','.join(spec.stages)} selects no matrix of this model")
        chosen = select_experts(spec.experts_select, model, tok, spec, targets)
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            # PEFT refuses dropout on bare parameters (x cannot be factored out of (W + BA) x there)
            lora_dropout=0.0 if targets.parameters else spec.dropout,
            target_modules=list(targets.modules),
            target_parameters=list(targets.parameters) or None,
            bias="none",
        )
        with peft_calls():
            peft_model = get_peft_model(model, config)
        peft_model.peft_config[ADAPTER].base_model_name_or_path = str(self.moe_dir.resolve())
        if targets.parameters and spec.dropout > 0:
            from peft.tuners.lora.layer import Linear as LoraLinear

            for mod in peft_model.modules():
                if isinstance(mod, LoraLinear):
                    mod.lora_dropout[ADAPTER] = nn.Dropout(spec.dropout)
        live = None if chosen is None else restrict_experts(peft_model, targets, chosen)
        self.targets, self.experts = targets, chosen
        if self.main and not self.resume:
            n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            # creates OUT: the train recipe does so only after the data
            write_spec_file(
                self.run_dir / FINETUNE_FILE, self.moe_dir, spec, _resolved(targets, chosen, n, live)
            )
        return peft_model

    def save_model(self, tmp: Path, state_dict: dict[str, torch.Tensor], result: TrainResult) -> None:
        super().save_model(tmp, state_dict, result)
        shutil.copy2(self.run_dir / FINETUNE_FILE, tmp / FINETUNE_FILE)

    def finish(self) -> TrainResult:
        result = super().finish()
        if self.lora.merge and self.main:
            merge_adapter(result.model_dir, self.run_dir / "merged", overwrite=True)
        self.accelerator.wait_for_everyone()
        return result


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
    result = recipe.run()
    merged = out / "merged" if spec.merge and recipe.main else None  # the main process wrote it
    return FinetuneResult(result, result.model_dir, merged, recipe.targets, recipe.experts)


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


def _resolved(
    targets: LoraTargets, experts: dict[int, list[int]] | None, trainable: int, live: int | None
) -> dict:
    """What `moegraft-finetune.json` records that the flags alone do not say."""
    return {
        "target_modules": list(targets.modules),
        "target_parameters": list(targets.parameters),
        "frozen_in_stages": list(targets.frozen),
        "experts": None if experts is None else {str(k): v for k, v in experts.items()},
        "trainable_params": trainable,
        # with --experts-select, the LoRA entries that can move (the rest is masked)
        "live_expert_params": live,
    }
