"""The distillation term: KL(teacher ‖ student) per token, computed a chunk of positions at a time.

In: student logits (B, T, V) with grad, teacher logits (B, T, V) without. Out: the mean per-token KL. Each chunk
runs under activation checkpointing, so backward keeps only the logits themselves: the fp32 log-probabilities of
student and teacher exist for one chunk at a time, never as two more (B, T, V) fp32 tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of KL(teacher ‖ student) for logits (B, c, V), in fp32."""
    s = F.log_softmax(student.float(), -1)  # (B, c, V)
    t = F.log_softmax(teacher.float(), -1)
    return (t.exp() * (t - s)).sum()


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) of logits (B, T, V), `chunk` positions at a time."""
    B, T, _ = student.shape
    total = torch.zeros((), dtype=torch.float32, device=student.device)
    for i in range(0, T, chunk):
        s, t = student[:, i : i + chunk], teacher[:, i : i + chunk]  # (B, c, V) views, no copy
        if torch.is_grad_enabled() and s.requires_grad:
            # backward recomputes this chunk's log-softmax instead of keeping it
            total = total + checkpoint(_kl_sum, s, t, use_reentrant=False)
        else:
            total = total + _kl_sum(s, t)
    return total / (B * T)
