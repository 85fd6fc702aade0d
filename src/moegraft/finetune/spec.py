"""What `moegraft finetune` trains: the stages that get LoRA adapters, their shape, which experts, the run.

In: flags (or a config). Out: a frozen FinetuneSpec, recorded in OUT's `moegraft-finetune.json`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from moegraft.errors import SpecError
from moegraft.train.spec import TrainSpec

Stage = Literal["dense", "experts", "router", "attention"]
FINETUNE_FILE = "moegraft-finetune.json"
# all | top-used:N | top-used:N@report.json (from `moegraft eval --report`) | expert ids like 0,3,5
SELECT = re.compile(r"^(?:all|top-used:(?P<n>\d+)(?:@(?P<report>.+))?|(?P<ids>\d+(?:,\d+)*))$")


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
        if not SELECT.match(self.experts_select):
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
        m = SELECT.match(self.experts_select)
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
