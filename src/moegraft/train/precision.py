"""Training precision: which dtype the weights are held in, what accelerate autocasts to, what is saved.

In: `--precision auto|fp32|bf16|fp16`, the device, the checkpoint's own dtype. Out: accelerate's mixed-precision
name, the dtype to load the model (and the distillation teacher) in, and the dtype the trained model is saved in.

The convention (the one accelerate's FSDP2 preparation also uses): under bf16/fp16 the frozen weights stay in the
checkpoint's dtype (a bf16 graft keeps its frozen dense path in bf16: 2 bytes a parameter, no optimizer state), the
trainable ones are fp32 master weights (AdamW updates them in fp32), and the forward runs under autocast. Under
fp32 everything is fp32. The trained model is saved in the checkpoint's dtype: trainable tensors are cast back
once, at the end; frozen ones were never changed, so they are saved bit-identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from moegraft.errors import SpecError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Resolved = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# accelerate's mixed_precision names
MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_FROM_ACCELERATE = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def resolve_precision(precision: Precision, device: str = "auto") -> Resolved:
    """auto: what `accelerate launch`'s config asks for (ACCELERATE_MIXED_PRECISION bf16/fp16), else bf16 on a CUDA
    GPU that supports it, else fp32 (CPU: bf16 works there but is ~10x slower than fp32).

    Raises:
        SpecError: fp16 without a CUDA GPU (accelerate supports fp16 autocast only on accelerators).
    """
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if precision == "auto":
        launcher = _FROM_ACCELERATE.get(os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), "fp32")
        if launcher != "fp32" and not (launcher == "fp16" and on_cpu):
            return launcher
        return "bf16" if not on_cpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and on_cpu:
        raise SpecError("--precision fp16 needs a CUDA GPU; use --precision bf16 or fp32 on CPU")
    return precision


def load_dtype(precision: Resolved, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The dtype to load a checkpoint in for training: fp32 under fp32, else the checkpoint's own dtype."""
    return torch.float32 if precision == "fp32" else checkpoint_dtype


def upcast_trainable(model: nn.Module) -> int:
    """Make every trainable floating parameter an fp32 master weight (mixed precision); returns how many moved."""
    moved = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            moved += 1
    return moved


def cast_floating(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with every floating tensor in `dtype` (integer buffers untouched)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def record_dtype(model_dir: Path, dtype: torch.dtype) -> None:
    """Write `dtype` into a saved config.json and its sub-configs: save_pretrained records the dtype of the first
    parameter it meets, which under mixed precision or an fp32 run is not the dtype the weights were saved in."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for cfg in [config, *(v for v in config.values() if isinstance(v, dict) and "dtype" in v)]:
        cfg["dtype"] = name
    path.write_text(json.dumps(config, indent=2) + "\n")
