"""Function-preservation check: the converted MoE against the dense model it came from.

In: two loaded causal LMs and token blocks. Out: max |Δlogit|, the logit scale, greedy agreement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ExactnessResult:
    max_abs_logit_diff: float
    max_abs_logit: float
    tokens: int
    greedy_tokens: int
    greedy_identical: bool
    dense_text: str
    moe_text: str

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def check_exactness(dense, moe, tokenizer, blocks: torch.Tensor, *, new_tokens: int = 24) -> ExactnessResult:
    """Compare logits on every block (B, T) and greedy continuations of the first block's first 32 tokens."""
    diff, scale = 0.0, 0.0
    for block in blocks:
        a = dense(block[None]).logits.float()
        b = moe(block[None]).logits.float()
        diff = max(diff, float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
    prompt = blocks[:1, :32]
    gen = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    ga = dense.generate(prompt, attention_mask=torch.ones_like(prompt), **gen)[0, prompt.shape[1] :]
    gb = moe.generate(prompt, attention_mask=torch.ones_like(prompt), **gen)[0, prompt.shape[1] :]
    return ExactnessResult(
        diff,
        scale,
        int(blocks.numel()),
        len(ga),
        bool(torch.equal(ga, gb)),
        tokenizer.decode(ga),
        tokenizer.decode(gb),
    )
