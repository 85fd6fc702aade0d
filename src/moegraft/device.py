"""Which device a step runs on, the dtype it computes in there by default, and the device's peak FLOP/s.

In: a `--device` name (auto, cpu, cuda, cuda:N) and, for MFU, the device or a user-given peak. Out: a
`torch.device`, a default dtype, and a peak in FLOP/s (or None when it is not known).

The one place moegraft decides "bf16 on CUDA": eval and bench load their models in bf16 there by default (fp32 on
CPU, where bf16 matmuls are ~10x slower); `train --precision auto` resolves the same way (train.precision).
Calibration (`convert`) computes in fp32 on every device: its k-means, neuron scores and least-squares refit pick
discrete things (centroids, neurons) that bf16 rounding would change, and on CPU it must stay bit-identical.
"""

from __future__ import annotations

import torch

from moegraft.errors import SpecError

# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, in TFLOP/s, matched in
# order against torch.cuda.get_device_name() (lower case): the first key contained in the name wins, so the more
# specific names come first. fp32 runs use the same table (TF32 peaks are half of these, so an fp32 MFU reads low).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),  # H200 SXM
    ("h100 nvl", 835.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # H100 SXM (HBM3); GH200 matches "h200" above, at the same peak
    ("b200", 2250.0),
    ("a100", 312.0),  # SXM and PCIe alike
    ("a800", 312.0),
    ("l40s", 362.0),
    ("a10g", 70.0),
    ("a10", 125.0),
    ("l4", 121.0),
    ("v100", 125.0),  # fp16 (no bf16 tensor cores)
    ("rtx 4090", 165.0),
    ("rtx 3090", 71.0),
)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The device `name` means: auto is the first CUDA GPU when there is one, else the CPU; otherwise any name
    torch knows (cpu, cuda, cuda:N, mps, ...).

    Raises:
        SpecError: a name torch does not know, or a CUDA device this machine does not have.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpecError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpecError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ...); "
                "pick one of them"
            )
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """What eval and bench load a model in when not told: bf16 on a CUDA GPU that has it, else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def peak_flops(device: torch.device | str, given_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one `device` for MFU: `given_tflops` (the user's --peak-tflops) if set, else the table's
    entry for a CUDA GPU's name, else None (a CPU, or a GPU the table does not know: no MFU is reported).

    Raises:
        SpecError: a given peak that is not positive.
    """
    if given_tflops is not None:
        if given_tflops <= 0:
            raise SpecError(f"--peak-tflops {given_tflops}: give the device's peak in TFLOP/s, > 0")
        return given_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)
