"""Language-model quality of a model against a baseline on the same token blocks, streamed.

In: logits (B, T, V) of the model and (optionally) the baseline for each batch of blocks (B, T).
Out: perplexity of each, mean KL(baseline ‖ model) per predicted token, and top-1 agreement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from moegraft.errors import MoegraftError


@dataclass(frozen=True)
class LMMetrics:
    """Sums turned into means over every predicted token (T - 1 per block)."""

    tokens: int  # predicted tokens
    nll: float  # mean negative log-likelihood of the model (nats)
    perplexity: float
    baseline_nll: float | None = None
    baseline_perplexity: float | None = None
    kl: float | None = None  # mean KL(baseline ‖ model) per token (nats)
    top1_agreement: float | None = None  # fraction of tokens where both argmaxes agree

    def to_json(self) -> dict:
        return asdict(self)


class LMAccumulator:
    """Accumulates NLL, KL and agreement batch by batch, so no more than one batch of logits is ever held.

    KL is computed in chunks of `chunk` positions to bound the (chunk, V) fp32 temporaries: a chunk holds about
    five of them at once, so with V = 49,152 (SmolLM2) 256 positions cost ~250 MB where 1024 cost ~1 GB, for the
    same sums (a vocabulary of 262k, Gemma's, costs ~1.3 GB at 256).
    """

    def __init__(self, *, chunk: int = 256):
        self.chunk = chunk
        self.tokens = 0
        self.nll = 0.0
        self.base_nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.has_baseline: bool | None = None

    @torch.no_grad()
    def update(
        self, blocks: torch.Tensor, logits: torch.Tensor, baseline_logits: torch.Tensor | None = None
    ) -> None:
        """Add one batch.

        Args:
            blocks: (B, T) token ids fed to both models.
            logits: (B, T, V) model logits; position t predicts token t + 1.
            baseline_logits: (B, T, V') baseline logits on the same blocks, or None.
        """
        has_base = baseline_logits is not None
        if self.has_baseline is None:
            self.has_baseline = has_base
        elif self.has_baseline != has_base:
            raise MoegraftError("every batch needs baseline logits, or none does")
        V = logits.shape[-1]
        targets = blocks[:, 1:].reshape(-1)  # (N,) with N = B·(T-1)
        lm = logits[:, :-1].reshape(-1, V)  # (N, V)
        if has_base:
            if baseline_logits.shape[-1] != V:
                # Tokenizers of one family may pad the embedding table differently; compare on the shared ids.
                Vs = min(V, baseline_logits.shape[-1])
                if int(blocks.max()) >= Vs:
                    raise MoegraftError(
                        f"the model has {V} output ids and the baseline {baseline_logits.shape[-1]}: they do not "
                        "share a tokenizer; pass a baseline with the same vocabulary"
                    )
                lm, V = lm[:, :Vs], Vs
            lb = baseline_logits[:, :-1, :V].reshape(-1, V)  # (N, V)
        for s in range(0, targets.numel(), self.chunk):
            t = targets[s : s + self.chunk]  # (n,)
            logp = torch.log_softmax(lm[s : s + self.chunk].float(), -1)  # (n, V)
            self.nll -= float(logp.gather(1, t[:, None]).sum())
            if has_base:
                logq = torch.log_softmax(lb[s : s + self.chunk].float(), -1)  # (n, V) baseline
                self.base_nll -= float(logq.gather(1, t[:, None]).sum())
                self.kl += float((logq.exp() * (logq - logp)).sum())
                self.agree += int((logq.argmax(-1) == logp.argmax(-1)).sum())
        self.tokens += targets.numel()

    def result(self) -> LMMetrics:
        if self.tokens == 0:
            raise MoegraftError("no tokens were evaluated")
        n = self.tokens
        nll = self.nll / n
        if not self.has_baseline:
            return LMMetrics(tokens=n, nll=nll, perplexity=math.exp(nll))
        base = self.base_nll / n
        return LMMetrics(
            tokens=n,
            nll=nll,
            perplexity=math.exp(nll),
            baseline_nll=base,
            baseline_perplexity=math.exp(base),
            kl=max(self.kl / n, 0.0),  # rounding can make an exact-zero KL read -1e-9
            top1_agreement=self.agree / n,
        )
