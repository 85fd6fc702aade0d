"""The LoRA model preparations a training recipe can be given: by pathway (`moegraft finetune`) and on every
linear layer of a dense model (`moegraft compare`'s baseline).

In: a loaded model (not yet PEFT-wrapped), its tokenizer and source. Out: `Prepared`, the PEFT-wrapped model and
what the preparation chose (PathwayLoraFacts: targets and experts; LoraSize: the rank sized to a target count).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moegraft.data import pack, read_texts
from moegraft.errors import CompareError, SourceError, SpecError
from moegraft.finetune.spec import SELECT, FinetuneSpec
from moegraft.models import parameters_by_pathway, peft_calls
from moegraft.routing import RouterTap, expert_counts
from moegraft.train.strategies import Prepared

ADAPTER = "default"  # PEFT's adapter name
_LAYER = re.compile(r"layers\.(\d+)\.")

__all__ = [
    "ADAPTER",
    "DenseLora",
    "LoraSize",
    "LoraTargets",
    "PathwayLora",
    "PathwayLoraFacts",
    "lora_rank",
    "lora_size",
    "lora_targets",
    "restrict_experts",
    "routing_counts",
    "select_experts",
]


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
    m = SELECT.match(select)  # FinetuneSpec validated it
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
class PathwayLoraFacts:
    """What PathwayLora placed: the targets, the experts that learn, and the trainable counts."""

    targets: LoraTargets
    experts: dict[int, list[int]] | None  # the experts trained per layer (None: all)
    trainable: int  # LoRA parameters that require grad
    live: int | None  # with --experts-select, the expert LoRA entries that can move (the rest is masked)

    def record(self) -> dict:
        """What `moegraft-finetune.json` records that the flags alone do not say."""
        return {
            "target_modules": list(self.targets.modules),
            "target_parameters": list(self.targets.parameters),
            "frozen_in_stages": list(self.targets.frozen),
            "experts": None if self.experts is None else {str(k): v for k, v in self.experts.items()},
            "trainable_params": self.trainable,
            # with --experts-select, the LoRA entries that can move (the rest is masked)
            "live_expert_params": self.live,
        }


@dataclass(frozen=True)
class PathwayLora:
    """`moegraft finetune`'s preparation: PEFT LoRA adapters on the matrices of the spec's stages (pathways),
    only the chosen experts' learning."""

    spec: FinetuneSpec
    adapter: bool = True

    def prepare(self, model: nn.Module, tok, source: Path) -> Prepared:
        from peft import LoraConfig, get_peft_model

        spec = self.spec
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
        peft_model.peft_config[ADAPTER].base_model_name_or_path = str(source.resolve())
        if targets.parameters and spec.dropout > 0:
            from peft.tuners.lora.layer import Linear as LoraLinear

            for mod in peft_model.modules():
                if isinstance(mod, LoraLinear):
                    mod.lora_dropout[ADAPTER] = nn.Dropout(spec.dropout)
        live = None if chosen is None else restrict_experts(peft_model, targets, chosen)
        n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        return Prepared(peft_model, PathwayLoraFacts(targets, chosen, n, live))


def lora_size(model: nn.Module) -> tuple[int, int]:
    """(Σ (in + out), smallest dimension) over the nn.Linear layers PEFT's "all-linear" adapts (all but lm_head).

    A rank-r LoRA on a Linear(in, out) trains r · (in + out) parameters, so the whole adapter has r · Σ.
    """
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    if not linears:
        raise CompareError(f"{type(model).__name__} has no linear layer besides lm_head to adapt")
    return sum(m.in_features + m.out_features for m in linears), min(
        min(m.in_features, m.out_features) for m in linears
    )


def lora_rank(target: int, per_rank: int) -> int:
    """The rank whose LoRA size r · per_rank is closest to `target` (at least 1).

    The size is linear in r, so the nearest integer to target / per_rank is the best rank: it misses the target
    by at most per_rank / 2 (unless even rank 1 is too big).
    """
    return max(1, round(target / per_rank))


@dataclass(frozen=True)
class LoraSize:
    """The dense LoRA's rank, its parameters per rank (Σ (in + out)), and the smallest adapted dimension."""

    rank: int
    per_rank: int
    smallest: int


@dataclass(frozen=True)
class DenseLora:
    """compare's baseline: an all-linear LoRA (alpha = rank, no dropout) on a dense model, its rank the one whose
    trainable parameter count is closest to `target` (the graft's)."""

    target: int
    base_name: str  # what the adapter records as its base model
    adapter: bool = True

    def prepare(self, model: nn.Module, tok, source: Path) -> Prepared:
        from peft import LoraConfig, get_peft_model

        per_rank, smallest = lora_size(model)
        rank = lora_rank(self.target, per_rank)
        config = LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear", bias="none"
        )
        with peft_calls():
            peft_model = get_peft_model(model, config)
        peft_model.peft_config[ADAPTER].base_model_name_or_path = self.base_name
        return Prepared(peft_model, LoraSize(rank, per_rank, smallest))
