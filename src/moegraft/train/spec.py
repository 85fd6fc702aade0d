"""The training spec: what `moegraft train` does, as one frozen pydantic model.

In: CLI flags or library kwargs. Out: a validated TrainSpec, saved as `moegraft-train.json` beside the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moegraft.config import build_spec
from moegraft.errors import SpecError
from moegraft.formats import PATHWAYS

BalanceName = Literal["aux", "bias", "none"]
SPEC_FILE = "moegraft-train.json"
# model_type of the formats with a native per-expert selection bias (DeepSeek-V3's aux-loss-free balancing)
SELECTION_BIAS_MODEL_TYPES = ("glm4_moe",)
META_FILE = "moegraft.json"  # what `moegraft convert` wrote beside the checkpoint (spec, source, carve stats)
# Defaults that depend on the checkpoint (TrainSpec.for_checkpoint). A graft trains fresh experts and its router
# on the next-token loss. A carve recovers the dense function: the shared part, experts and router all train,
# distilled from the dense source only (CE on the recovery text would also adapt the model to that text, and
# the comparison with dense would no longer be fair), at a learning rate for pre-trained weights.
GRAFT_TRAINABLE = ("router", "experts")
CARVE_TRAINABLE = ("router", "experts", "dense")
GRAFT_LR = 1e-3
CARVE_LR = 1e-4


def read_meta(checkpoint: str | Path) -> dict | None:
    """The moegraft.json `moegraft convert` wrote beside a checkpoint, or None (a dense model, a .gguf)."""
    p = Path(checkpoint) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else None


class TrainSpec(BaseModel):
    """How to train a converted MoE checkpoint's router and experts.

    One optimizer step sees `batch · grad_accum · processes` blocks of `seq_len` tokens (the global batch).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field(
        "stdlib:train", description="text files/folders, .jsonl, .parquet, a dataset, or stdlib:*"
    )
    eval_data: str | None = Field(None, description="held-out text; default: the tail of --data")
    eval_fraction: float = Field(
        0.05, description="share of --data blocks held out when --eval-data is absent"
    )
    eval_blocks: int = Field(64, description="at most this many held-out blocks are evaluated")
    tokens: int | None = Field(None, description="training budget in tokens (exclusive with --steps)")
    steps: int | None = Field(None, description="training budget in optimizer steps; default one epoch")
    seq_len: int = 256
    batch: int = Field(4, description="blocks per micro-batch per process")
    grad_accum: int = 1
    lr: float | None = Field(None, description=f"peak lr; default {GRAFT_LR:g} (graft), {CARVE_LR:g} (carve)")
    min_lr_ratio: float = Field(0.1, description="cosine schedule ends at lr · min_lr_ratio")
    warmup_steps: int | None = Field(None, description="linear warmup; default 5% of the steps")
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    trainable: tuple[str, ...] | None = Field(
        None, description="pathways to train; default router,experts (graft), router,experts,dense (carve)"
    )
    loss_mask: Literal["all", "assistant"] = Field(
        "all", description="assistant: loss only on assistant tokens of chat `messages` rows (text rows: all)"
    )
    balance: BalanceName = "aux"
    aux_coef: float = Field(0.01, description="Switch/GShard loss coefficient (with --balance aux)")
    z_coef: float = Field(0.001, description="router z-loss coefficient (0 disables)")
    bias_rate: float = Field(0.001, description="selection-bias update rate (with --balance bias)")
    distill: str | None = Field(
        "auto",
        description="dense teacher for a KL term on logits (same tokenizer); auto: a carved checkpoint's dense "
        "source (moegraft.json), none for a graft; 'none' or None: no teacher",
    )
    distill_weight: float = 1.0
    ce_weight: float | None = Field(
        None, description="weight of the next-token loss; default 0 when distilling a carve, else 1"
    )
    distill_chunk: int = Field(
        128,
        description="sequence positions per chunk of the distillation KL (bounds its fp32 (B, T, V) copies)",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="mixed precision through accelerate; auto: bf16 on a CUDA GPU that has it, else fp32",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer in backward (non-reentrant): activations for memory"
    )
    save_every: int = Field(0, description="checkpoint every N steps (0: only on Ctrl-C)")
    eval_every: int = Field(0, description="held-out perplexity every N steps (0: only at the end)")
    log_every: int = 10
    seed: int = 0
    device: str = Field("auto", description="'auto' (accelerate decides), 'cpu', 'cuda', ...")
    tensorboard: bool = False

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.trainable is not None:
            bad = [t for t in self.trainable if t not in PATHWAYS]
            if bad:
                raise ValueError(
                    f"--trainable {','.join(bad)}: not a pathway; choose from {','.join(PATHWAYS)}"
                )
            if not self.trainable:
                raise ValueError("--trainable is empty; name at least one pathway (e.g. router,experts)")
        if self.tokens is not None and self.steps is not None:
            raise ValueError("--tokens and --steps both given; pass one budget")
        for name in ("seq_len", "batch", "grad_accum", "eval_blocks", "distill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("tokens", "steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name} must be >= 1 (got {v})")
        for name in (
            "lr",
            "ce_weight",
            "aux_coef",
            "z_coef",
            "bias_rate",
            "distill_weight",
            "weight_decay",
            "max_grad_norm",
        ):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in (0, 1) (got {self.eval_fraction})")
        return self

    @classmethod
    def build(cls, **kwargs) -> TrainSpec:
        """Construct a spec, turning pydantic's multi-line report into one SpecError line."""
        if isinstance(kwargs.get("trainable"), str):
            kwargs["trainable"] = tuple(t.strip() for t in kwargs["trainable"].split(",") if t.strip())
        return build_spec(cls, kwargs)

    def for_checkpoint(self, meta: dict | None, *, recovery: bool = True) -> TrainSpec:
        """This spec with every 'auto' field decided for the checkpoint whose moegraft.json is `meta`.

        Args:
            meta: the checkpoint's moegraft.json (None: not written by moegraft, e.g. a dense model).
            recovery: False when an adapter decides what trains (finetune, compare's LoRA): a carve then gets
                no automatic teacher and keeps the next-token loss.

        Raises:
            SpecError: the loss would be empty (--ce-weight 0 without a teacher).
        """
        carved = bool(meta) and (meta.get("spec") or {}).get("init") == "carve"
        distill = None if self.distill in (None, "none") else self.distill
        if distill == "auto":
            distill = meta.get("source") if carved and recovery else None
        ce = self.ce_weight
        if ce is None:
            ce = 0.0 if carved and distill is not None else 1.0
        if ce == 0 and distill is None:
            raise SpecError(
                "--ce-weight 0 without a teacher leaves no loss; pass --distill DENSE or a weight > 0"
            )
        return self.model_copy(
            update={
                "trainable": self.trainable or (CARVE_TRAINABLE if carved else GRAFT_TRAINABLE),
                "lr": self.lr if self.lr is not None else (CARVE_LR if carved else GRAFT_LR),
                "distill": distill,
                "ce_weight": ce,
            }
        )

    def check_model(self, config: dict) -> None:
        """Raise SpecError if this spec cannot apply to the MoE model with this config.json."""
        mt = config.get("model_type")
        if self.balance == "bias" and mt not in SELECTION_BIAS_MODEL_TYPES:
            raise SpecError(
                f"--balance bias needs a per-expert selection bias, which {mt} has not (only "
                f"{', '.join(SELECTION_BIAS_MODEL_TYPES)}); use --balance aux"
            )

    def same_run(self, other: TrainSpec) -> bool:
        """True if `other` describes the same training run (what --resume requires)."""
        skip = {"log_every", "save_every", "eval_every", "device", "tensorboard"}
        return self.model_dump(exclude=skip) == other.model_dump(exclude=skip)
