"""A runtime's greedy continuations against transformers': the comparison and the row it fills.

In: transformers' model, the prompts, its greedy continuations and a runtime's (with that runtime's logprobs).
Out: identical tokens up to each first divergence, and the largest |Δ logprob| of the tokens the runtime chose.
Its own module so that each runtime's driver (llama_cpp_runtime.py) and parity.py share it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RuntimeParity:
    """One runtime against transformers; `reason` says why it did not run (the numbers are then None)."""

    runtime: str
    greedy_identical: int | None = (
        None  # tokens matching transformers', each prompt up to its first divergence
    )
    greedy_total: int | None = None
    max_abs_dlogprob: float | None = None  # over every token the runtime chose
    max_abs_dlogit: float | None = None  # llama.cpp: over every position and vocabulary entry of the prompts
    extra: dict = field(default_factory=dict)  # runtime-specific (llama.cpp's perplexities, vLLM's source)
    reason: str | None = None

    def summary(self) -> str:
        if self.reason is not None:
            return f"{self.runtime}: not run: {self.reason}"
        parts = [f"greedy {self.greedy_identical}/{self.greedy_total} tokens identical"]
        if self.max_abs_dlogprob is not None:
            parts.append(f"max |Δ logprob| {self.max_abs_dlogprob:.3g}")
        if self.max_abs_dlogit is not None:
            parts.append(f"max |Δ logit| {self.max_abs_dlogit:.3g}")
        if "perplexity" in self.extra:
            p = self.extra["perplexity"]
            parts.append(f"perplexity {p['llama_cpp']:.4f} vs {p['transformers']:.4f}")
        return f"{self.runtime}: " + ", ".join(parts)


@torch.no_grad()
def chosen_logprobs(model, prompt: list[int], continuation: list[int]) -> list[float]:
    """log p(continuation[i] | prompt + continuation[:i]) under `model`, one teacher-forced forward pass."""
    ids = torch.tensor([prompt + continuation])  # (1, P + N)
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (N, V): position t predicts token t + 1
    logp = torch.log_softmax(logits, dim=-1)  # (N, V)
    return logp.gather(1, torch.tensor(continuation)[:, None])[:, 0].tolist()  # (N,)


def matched_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare_continuations(
    model,
    prompts: list[list[int]],
    reference: list[list[int]],
    got: list[list[int]],
    got_logprobs: list[list[float]],
) -> tuple[int, int, float]:
    """(identical tokens, total, max |Δ logprob|) of a runtime's greedy continuations against transformers'.

    Δ logprob compares, at every token the runtime chose, its logprob with transformers' logprob of that same
    token in that same context: defined past a divergence too, where positionwise comparison would not be.
    """
    same = sum(matched_prefix(r, g) for r, g in zip(reference, got, strict=True))
    total = sum(len(r) for r in reference)
    worst = 0.0
    for p, g, lp in zip(prompts, got, got_logprobs, strict=True):
        ref_lp = chosen_logprobs(model, p, g)
        worst = max(worst, max((abs(a - b) for a, b in zip(ref_lp, lp, strict=True)), default=0.0))
    return same, total, worst
