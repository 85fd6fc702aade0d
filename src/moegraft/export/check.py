"""`export --check`: run the GGUF in llama.cpp and the checkpoint in transformers on the same tokens.

In: the MoE directory, its GGUF, and token ids (default: held-out stdlib prose). Out: max |Δlogit| over
every position, teacher-forced argmax agreement, both runtimes' free-running greedy continuations, and
(`--check-data`) both perplexities on the same blocks of a given text, computed from each runtime's own logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moegraft.eval.metrics import LMAccumulator, LMMetrics
from moegraft.export.llama_cpp import open_llama
from moegraft.models import cached_forward


@dataclass(frozen=True)
class CheckResult:
    tokens: int
    max_abs_dlogit: float
    mean_abs_dlogit: float
    argmax_agreement: float  # fraction of positions where both pick the same next token
    greedy_hf: list[int]
    greedy_llama: list[int]
    logit_scale: float = 0.0  # max |logit| of transformers: random small models have large logits

    @property
    def greedy_identical(self) -> bool:
        return self.greedy_hf == self.greedy_llama

    def to_json(self) -> dict:
        return {**asdict(self), "greedy_identical": self.greedy_identical}

    def summary(self) -> str:
        same = sum(a == b for a, b in zip(self.greedy_hf, self.greedy_llama, strict=True))
        return (
            f"{self.tokens} tokens: max |Δlogit| {self.max_abs_dlogit:.3g} (mean {self.mean_abs_dlogit:.2g}, "
            f"logit scale {self.logit_scale:.3g}), "
            f"argmax agreement {self.argmax_agreement:.1%}, greedy {same}/{len(self.greedy_hf)} tokens identical"
        )


def prose_ids(tokenizer, n_tokens: int, texts: str = "stdlib:heldout") -> list[int]:
    """The first `n_tokens` token ids of held-out real prose."""
    from moegraft.data import read_texts

    ids: list[int] = []
    for text in read_texts(texts):
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt`, one decode step at a time with the KV cache."""
    logits, cache = cached_forward(model, torch.tensor([prompt]))
    toks = []
    for _ in range(n):
        tok = int(logits[0, -1].argmax())
        toks.append(tok)
        logits, cache = cached_forward(model, torch.tensor([[tok]]), cache)
    return toks


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt` in llama.cpp (argmax of its logits, as hf_greedy)."""
    llm.reset()
    llm.eval(prompt)
    toks = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        toks.append(tok)
        llm.eval([tok])
    return toks


def check_gguf(
    model_dir: str | Path,
    gguf: str | Path,
    *,
    ids: list[int] | None = None,
    n_tokens: int = 256,
    n_greedy: int = 32,
    n_threads: int | None = None,
) -> CheckResult:
    """Compare llama.cpp (fp32 KV cache) with transformers (fp32) on the same tokens.

    Args:
        model_dir: the checkpoint the GGUF was exported from.
        ids: token ids to score; default the first `n_tokens` of held-out stdlib prose.
        n_greedy: greedy tokens to generate after the first 16 tokens.
    """
    from moegraft.models import load_causal_lm

    model, tok = load_causal_lm(model_dir, dtype=torch.float32, with_tokenizer=ids is None)
    if ids is None:
        ids = prose_ids(tok, n_tokens)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()  # (T, V)
    llm = open_llama(gguf, n_ctx=max(len(ids), 16 + n_greedy) + 8, n_threads=n_threads)
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)
        V = ref.shape[1]
        diff = np.abs(got[:, :V] - ref)  # (T, V)
        agree = float((got[:, :V].argmax(-1) == ref.argmax(-1)).mean())
        prompt = ids[:16]
        g_llama = llama_greedy(llm, prompt, n_greedy)
    finally:
        llm.close() if hasattr(llm, "close") else None
    g_hf = hf_greedy(model, prompt, n_greedy)
    scale = float(np.abs(ref).max())
    return CheckResult(len(ids), float(diff.max()), float(diff.mean()), agree, g_hf, g_llama, scale)


# ---------------------------------------------------------------------------------------------
# Perplexity from llama.cpp's own logits, on the blocks `moegraft eval` scores


def llama_perplexity(gguf: str | Path, blocks: torch.Tensor, *, n_threads: int | None = None) -> LMMetrics:
    """Perplexity of `gguf` in llama.cpp on `blocks` (N, T): each block from an empty KV cache (f32), every
    position scored, as `moegraft eval` scores transformers (position t predicts token t + 1)."""
    T = blocks.shape[1]
    llm = open_llama(gguf, n_ctx=T, n_threads=n_threads)
    acc = LMAccumulator()
    try:
        for block in blocks:
            llm.reset()
            llm.eval(block.tolist())
            logits = torch.from_numpy(np.asarray(llm.scores[:T], dtype=np.float32))  # (T, V)
            acc.update(block[None], logits[None])
    finally:
        llm.close()
    return acc.result()


@dataclass(frozen=True)
class PerplexityCheck:
    data: str
    tokens: int  # predicted tokens
    seq_len: int
    llama_cpp: float
    transformers: float  # the checkpoint in fp32

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.data}, {self.tokens} tokens in blocks of {self.seq_len}: llama.cpp {self.llama_cpp:.4f}, "
            f"transformers (fp32) {self.transformers:.4f} (ratio {self.llama_cpp / self.transformers:.4f})"
        )


def check_perplexity(
    model_dir: str | Path,
    gguf: str | Path,
    data: str,
    *,
    max_tokens: int = 4096,
    seq_len: int = 256,
    n_threads: int | None = None,
) -> PerplexityCheck:
    """Perplexity of the GGUF in llama.cpp beside the checkpoint's in transformers, on the same blocks of `data`.

    Args:
        model_dir: the checkpoint the GGUF was exported from (its tokenizer cuts the blocks).
        data: text as `moegraft eval --data` reads it (file, folder, .jsonl, stdlib:heldout, ...).
    """
    from moegraft.eval.evaluate import lm_metrics, token_blocks
    from moegraft.models import load_causal_lm

    model, tok = load_causal_lm(model_dir, dtype=torch.float32, with_tokenizer=True)
    blocks = token_blocks(data, tok, seq_len=seq_len, max_tokens=max_tokens)  # (N, T)
    ref = lm_metrics(model, blocks)
    del model
    got = llama_perplexity(gguf, blocks, n_threads=n_threads)
    return PerplexityCheck(str(data), got.tokens, seq_len, got.perplexity, ref.perplexity)
