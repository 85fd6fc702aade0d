"""A run's data: text packed into token blocks, and deterministic batches of them by (step, micro-step, process).

In: a data source and the tokenizer, or packed blocks (N, T). Out: blocks (N, T) or, with a loss mask,
(N, 2, T); each process's micro-batch (B, T) for any step, so that resuming needs only the step number, and one
process and P processes with the same global batch see exactly the same blocks; a digest of the blocks.
"""

from __future__ import annotations

import hashlib

import torch

from moegraft.data import pack, pack_masked, read_texts
from moegraft.errors import MoegraftError


def read_blocks(
    source: str, tok, *, seq_len: int, loss_mask: str = "all", max_blocks: int | None = None
) -> torch.Tensor:
    """Packed blocks (N, T); with loss_mask "assistant", ids and mask stacked (N, 2, T) so they batch together."""
    if loss_mask == "all":
        return pack(read_texts(source, tokenizer=tok), tok, seq_len, max_blocks=max_blocks)
    docs = read_texts(source, tokenizer=tok, keep_messages=True)
    ids, mask = pack_masked(docs, tok, seq_len, max_blocks=max_blocks)  # (N, T) each
    return torch.stack([ids, mask.long()], 1)  # (N, 2, T)


def blocks_digest(blocks: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of token blocks' ids as int64, in order: equal digests = the same data."""
    return hashlib.sha256(blocks.long().contiguous().numpy().tobytes()).hexdigest()[:16]


class BlockStream:
    """An endless stream of blocks, reshuffled each epoch with a generator seeded by (seed, epoch).

    Step s uses stream positions [s·G, (s+1)·G) with G = batch · grad_accum · processes; within it, micro-step m
    of process r takes the `batch` positions starting at (m · processes + r) · batch.
    """

    def __init__(self, blocks: torch.Tensor, *, batch: int, grad_accum: int, processes: int, seed: int):
        self.blocks = blocks  # (N, T)
        self.batch, self.grad_accum, self.processes, self.seed = batch, grad_accum, processes, seed
        self._perm: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.batch * self.grad_accum * self.processes

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(len(self.blocks), generator=g)}  # keep one epoch in memory
        return self._perm[epoch]

    def micro_batch(self, step: int, micro: int, rank: int) -> torch.Tensor:
        """(B, T) token ids for process `rank` at micro-step `micro` of optimizer step `step` (0-based)."""
        start = step * self.global_batch + (micro * self.processes + rank) * self.batch
        n = len(self.blocks)
        idx = [int(self._order(p // n)[p % n]) for p in range(start, start + self.batch)]
        return self.blocks[idx]  # (B, T)


def split_heldout(
    blocks: torch.Tensor, fraction: float, max_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, heldout): the held-out blocks are the tail of the corpus (contiguous, so little overlap leaks)."""
    if len(blocks) < 2:
        raise MoegraftError(
            f"the data gives {len(blocks)} block(s) of --seq-len; need at least 2 to hold one out (or pass --eval-data)"
        )
    k = min(max_blocks, max(1, round(len(blocks) * fraction)))
    return blocks[:-k], blocks[-k:]
