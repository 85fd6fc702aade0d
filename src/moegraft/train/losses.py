"""The next-token loss the recipes minimise and the held-out loss they report.

In: logits (B, T, V) and token ids (B, T), optionally a loss mask (B, T); or a model and held-out blocks (N, T)
/ masked blocks (N, 2, T). Out: a mean cross-entropy in fp32; for held-out blocks, shared over the processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator

IGNORE = -100  # the target of a position that has none: the last of each block, and masked-out tokens


def next_token_loss(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) on ids (B, T), in fp32.

    With a loss mask (B, T), only the targets where it is true count (e.g. assistant tokens of a chat).
    The targets shift, not the logits (as transformers' own loss does): `logits[:, :-1]` copied the (B, T-1, V)
    logits and its backward zero-filled a (B, T, V) gradient. At 4 × 256 tokens and SmolLM2's 49k vocabulary the
    loss's forward + backward took 345 ms sliced and 208 ms shifted on this CPU, with the same loss and gradient to
    the bit (benchmarks/bench_next_token_loss.py); the copy grows with the vocabulary (Gemma's is 262k).
    """
    targets = F.pad(ids[:, 1:], (0, 1), value=IGNORE)  # (B, T): position t predicts token t+1; the last, none
    if mask is not None:
        targets = targets.masked_fill(~F.pad(mask[:, 1:], (0, 1), value=False), IGNORE)
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )  # (B·T, V) vs (B·T,), a view of the logits
    # a micro-batch without any target token contributes 0, not NaN
    return total / (targets != IGNORE).sum().clamp_min(1)


def split_mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks (B, T) → (ids, None); masked blocks (B, 2, T) (ids and loss mask stacked) → (ids, mask)."""
    return (x, None) if x.dim() == 2 else (x[:, 0], x[:, 1].bool())


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module, blocks: torch.Tensor, batch: int, accelerator: Accelerator | None = None
) -> float:
    """Token-weighted mean next-token loss on blocks (N, T), or masked blocks (N, 2, T) on their masked targets;
    with an accelerator, shared over its processes."""
    was_training = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    mine = blocks[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    # FSDP gathers each layer's weights in every forward, so every process runs the same number of batches:
    # one whose blocks ran out scores a stand-in block with weight 0
    per_rank = -(-len(blocks) // world)
    for i in range(0, per_rank, batch):
        part = mine[i : i + batch] if i < len(mine) else blocks[:1]
        x, m = split_mask(part.to(device))  # (b, T), (b, T) or None
        n = 0 if i >= len(mine) else x.numel() - x.shape[0] if m is None else int(m[:, 1:].sum())
        total += torch.tensor(
            [float(next_token_loss(model(input_ids=x, use_cache=False).logits, x, m)) * n, n],
            dtype=torch.float64,
            device=device,
        )
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, "sum")
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1))
