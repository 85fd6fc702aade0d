"""The training spec: what `moegraft train` does, as one frozen pydantic model.

In: CLI flags or library kwargs. Out: a validated TrainSpec, and the run's record `moegraft-train.json` beside the
outputs (write_spec_file), which --resume reads back (read_saved_spec).
Each field's description is the help line its flag shows (moegraft.options makes the flags from the fields).
This module imports no torch, so that the CLI can read the fields while `moegraft --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moegraft import __version__
from moegraft.config import build_spec, flag_names
from moegraft.errors import MoegraftError, SpecError
from moegraft.io.atomic import write_text_atomic

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
# Before the end-to-end KL, a carve's FFNs are fitted layer by layer to the dense ones (moegraft.train.layerwise):
# on SmolLM2-135M at 50% active, 4 epochs at 5e-3 over 36k tokens roughly halved each layer's held-out error
# (layer 0: 0.094 -> 0.046; 8 epochs 0.040 for twice the time; 1e-4 barely moved it: 0.086)
CARVE_LAYERWISE_EPOCHS = 4
# What --resume may change: how often the run logs, saves and evaluates, and where it runs; not what it computes.
RESUME_FREE = frozenset({"log_every", "save_every", "eval_every", "device", "tensorboard", "peak_tflops"})


def _short(x: float) -> str:
    """1e-3, not 0.001 or 1e-03: how the help line writes a learning rate."""
    return f"{x:.0e}".replace("e-0", "e-")


def read_meta(checkpoint: str | Path) -> dict | None:
    """The moegraft.json `moegraft convert` wrote beside a checkpoint, or None (a dense model, a .gguf)."""
    p = Path(checkpoint) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else None


Spec = TypeVar("Spec", bound=BaseModel)


def write_spec_file(
    path: Path, moe_dir: Path, spec: BaseModel, resolved: dict, result: dict | None = None
) -> None:
    """A run's record (`moegraft-train.json`, `moegraft-finetune.json`): version, source, spec, what it resolved
    to and, once trained, the result; written atomically."""
    doc = {
        "moegraft_version": __version__,
        "moe_dir": str(moe_dir),
        "spec": spec.model_dump(),
        "resolved": resolved,
    }
    if result is not None:
        doc["result"] = result
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


def read_saved_spec(path: Path, cls: type[Spec]) -> Spec:
    """The spec a run recorded at `path`, for --resume to compare the new flags with."""
    if not path.is_file():
        raise MoegraftError(f"--resume: {path} not found; start without --resume")
    return cls.model_validate(json.loads(path.read_text())["spec"])


# The TrainSpec fields a training command offers, in --help order. The others (eval_fraction, eval_blocks,
# min_lr_ratio, warmup_steps, weight_decay, max_grad_norm, distill_chunk) are for library callers.
TRAIN_FLAGS = (
    "data",
    "eval_data",
    "tokens",
    "steps",
    "seq_len",
    "batch",
    "grad_accum",
    "lr",
    "trainable",
    "balance",
    "aux_coef",
    "z_coef",
    "bias_rate",
    "loss_mask",
    "distill",
    "distill_weight",
    "ce_weight",
    "layerwise_epochs",
    "layerwise_lr",
    "layerwise_tokens",
    "save_every",
    "eval_every",
    "log_every",
    "seed",
    "device",
    "precision",
    "gradient_checkpointing",
    "compile",
    "tensorboard",
    "peak_tflops",
)
# The layer-wise phase is `train`'s recovery of a carve: commands that train adapters drop its flags.
LAYERWISE_FLAGS = ("layerwise_epochs", "layerwise_lr", "layerwise_tokens")
# The help line of a fixed learning rate (finetune, compare): TrainSpec's says how 'auto' picks one.
FIXED_LR_HELP = "peak learning rate (warmup, then cosine)"


class RunOptions(BaseModel):
    """How a training command treats its output directory and the terminal; not what the run computes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resume: bool = Field(
        False,
        description="continue from the latest checkpoint in OUT",
        json_schema_extra=flag_names("--resume"),
    )
    overwrite: bool = Field(
        False, description="replace an existing OUT", json_schema_extra=flag_names("--overwrite")
    )
    quiet: bool = Field(False, description="no progress bar", json_schema_extra=flag_names("--quiet"))


class TrainSpec(BaseModel):
    """How to train a converted MoE checkpoint's router and experts.

    One optimizer step sees `batch · grad_accum · processes` blocks of `seq_len` tokens (the global batch).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field(
        "stdlib:train", description="text: .txt/folder, .jsonl, .parquet, a dataset name, or stdlib:train"
    )
    eval_data: str | None = Field(None, description="held-out text (default: the tail of --data)")
    eval_fraction: float = Field(
        0.05, description="share of --data blocks held out when --eval-data is absent"
    )
    eval_blocks: int = Field(64, description="at most this many held-out blocks are evaluated")
    tokens: int | None = Field(None, description="budget in tokens")  # exclusive with steps
    steps: int | None = Field(None, description="budget in optimizer steps (default: one epoch)")
    seq_len: int = Field(256, description="tokens per block")
    batch: int = Field(4, description="blocks per micro-batch per process")
    grad_accum: int = Field(1, description="micro-batches per optimizer step")
    lr: float | None = Field(
        None, description=f"peak learning rate (default: {_short(GRAFT_LR)} graft, {_short(CARVE_LR)} carve)"
    )
    min_lr_ratio: float = Field(0.1, description="cosine schedule ends at lr · min_lr_ratio")
    warmup_steps: int | None = Field(None, description="linear warmup; default 5% of the steps")
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    trainable: tuple[str, ...] | None = Field(
        None,
        description="pathways to train: router,experts,dense,attention,norms,embeddings (default: router,experts; "
        "a carved checkpoint: router,experts,dense, its shared part included)",
    )
    loss_mask: Literal["all", "assistant"] = Field(
        "all", description="assistant: loss only on assistant tokens of chat .jsonl"
    )  # (text rows count every token)
    balance: BalanceName = Field(
        "aux", description="aux: Switch loss per layer; bias: selection bias (GLM); none"
    )
    aux_coef: float = Field(0.01, description="Switch/GShard loss coefficient")
    z_coef: float = Field(0.001, description="router z-loss coefficient (0: off)")
    bias_rate: float = Field(0.001, description="selection-bias update rate (--balance bias)")
    # the teacher shares the tokenizer; "none" or None: no teacher
    distill: str | None = Field(
        "auto",
        description="dense teacher for a KL term; auto: a carved checkpoint's dense source (from moegraft.json), "
        "no teacher for a graft; none: no teacher",
    )
    distill_weight: float = Field(1.0, description="weight of the KL term")
    ce_weight: float | None = Field(
        None, description="weight of the next-token loss (default: 0 when a carve distils, else 1)"
    )
    layerwise_epochs: int | None = Field(
        None,
        description="epochs of layer-wise distillation (each FFN fitted to the teacher's FFN on the same inputs) "
        f"before end-to-end training (default: {CARVE_LAYERWISE_EPOCHS} for a carve with a teacher, else 0)",
    )
    layerwise_lr: float = Field(5e-3, description="peak learning rate of the layer-wise phase")
    layerwise_tokens: int | None = Field(
        None,
        description="--data tokens the layer-wise phase fits on (default: the --tokens budget, else all)",
    )
    distill_chunk: int = Field(
        128,
        description="sequence positions per chunk of the distillation KL (bounds its fp32 (B, T, V) copies)",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="mixed precision (accelerate); auto: bf16 on a CUDA GPU that has it, fp32 on CPU",
    )
    # non-reentrant, so that gradients reach the trainable layers
    gradient_checkpointing: bool = Field(
        False,
        description="recompute decoder layers in backward: less activation memory",
        json_schema_extra=flag_names("--gradient-checkpointing"),
    )
    compile: bool = Field(
        False,
        description="torch.compile one decoder layer, reused by all: faster steps after a compile of about a "
        "minute (a resumed run must match)",
        json_schema_extra=flag_names("--compile"),
    )
    save_every: int = Field(0, description="checkpoint every N steps (0: only on Ctrl-C)")
    eval_every: int = Field(0, description="held-out perplexity every N steps (0: at the end)")
    log_every: int = Field(10, description="metrics row every N steps")
    seed: int = Field(0, description="seed for data order and initialisation")
    # 'auto': accelerate decides; the library also takes 'cuda', 'mps', ...
    device: str = Field("auto", description="auto or cpu (GPUs: use `accelerate launch`)")
    tensorboard: bool = Field(
        False, description="also log to OUT/tensorboard", json_schema_extra=flag_names("--tensorboard")
    )
    peak_tflops: float | None = Field(
        None,
        description="the device's peak TFLOP/s for MFU (default: known CUDA GPUs by name, bf16 dense, e.g. "
        "H100/H200 989; none on CPU)",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.trainable is not None:
            from moegraft.formats import PATHWAYS  # here, not at import: formats loads torch

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
        for name in ("tokens", "steps", "layerwise_tokens"):
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
            "layerwise_epochs",
            "layerwise_lr",
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
            SpecError: the loss would be empty (--ce-weight 0 without a teacher), or a layer-wise phase was asked
                for a checkpoint that is not a carve or without a teacher.
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
        layerwise = self.layerwise_epochs
        if layerwise is None:
            layerwise = CARVE_LAYERWISE_EPOCHS if carved and distill is not None and recovery else 0
        elif layerwise and not recovery:
            raise SpecError(
                "--layerwise-epochs is `moegraft train`'s recovery of a carve; adapters do not run it"
            )
        elif layerwise and not carved:
            # a graft's FFN is the dense FFN plus new experts: there is no dense output for its experts to match
            raise SpecError(
                "--layerwise-epochs fits carved FFNs to the dense ones; this checkpoint is not a carve (pass 0)"
            )
        elif layerwise and distill is None:
            raise SpecError("--layerwise-epochs needs the dense model as teacher; pass --distill DENSE")
        return self.model_copy(
            update={
                "layerwise_epochs": layerwise,
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

    def differences(self, other: TrainSpec) -> list[str]:
        """The fields, sorted, in which `other` describes another training run (RESUME_FREE ones aside)."""
        mine, theirs = self.model_dump(exclude=RESUME_FREE), other.model_dump(exclude=RESUME_FREE)
        return sorted(k for k, v in mine.items() if theirs[k] != v)

    def same_run(self, other: TrainSpec) -> bool:
        """True if `other` describes the same training run (what --resume requires)."""
        return not self.differences(other)
