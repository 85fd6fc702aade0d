"""The eval recipe: a model (and its dense baseline) over the same token blocks, plus optional lm-eval tasks.

In: a model and baseline (objects or sources), data (a corpus name, path, or (N, T) token blocks).
Out: an EvalResult (moegraft.eval.result: perplexities, KL, top-1 agreement, router health per MoE layer),
optionally a report dir (moegraft.eval.report).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from moegraft.data import pack, read_texts
from moegraft.device import default_dtype, resolve_device
from moegraft.errors import MoegraftError
from moegraft.eval.experts import current_experts_impl
from moegraft.eval.loading import as_dtype, resolve_model
from moegraft.eval.metrics import LMAccumulator, LMMetrics
from moegraft.eval.result import EvalResult
from moegraft.eval.routing_report import RoutingAccumulator
from moegraft.progress import Progress
from moegraft.routing import RouterTap, router_modules


@torch.no_grad()
def lm_metrics(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    baseline: nn.Module | None = None,
    batch_size: int = 2,
    device: str = "cpu",
) -> LMMetrics:
    """Perplexity (and KL / top-1 agreement vs `baseline`) of a loaded model on blocks (N, T); no routing."""
    lm = LMAccumulator()
    for s in range(0, len(blocks), batch_size):
        x = blocks[s : s + batch_size].to(device)  # (B, T)
        logits = model(x, use_cache=False).logits  # (B, T, V)
        base_logits = None if baseline is None else baseline(x, use_cache=False).logits  # (B, T, V)
        lm.update(x.cpu(), logits.cpu(), None if base_logits is None else base_logits.cpu())
    return lm.result()


def token_blocks(
    data: str | Path | torch.Tensor, tokenizer, *, seq_len: int, max_tokens: int
) -> torch.Tensor:
    """(N, seq_len) blocks with N·seq_len ≤ max_tokens, from a corpus/path or given blocks."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise MoegraftError(f"token blocks must be (N, T), got shape {tuple(data.shape)}")
        return data[: max(1, max_tokens // data.shape[1])].long()
    if tokenizer is None:
        raise MoegraftError("reading text needs a tokenizer: pass tokenizer=, or a model path that has one")
    if max_tokens < seq_len:
        raise MoegraftError(f"--max-tokens {max_tokens} is less than one block of --seq-len {seq_len}")
    return pack(read_texts(data, tokenizer=tokenizer), tokenizer, seq_len, max_blocks=max_tokens // seq_len)


@torch.no_grad()
def _check_vocabulary(top_id: int, model: nn.Module, baseline: nn.Module | None) -> None:
    """Raises MoegraftError when a token id is outside either model's vocabulary (another tokenizer's text)."""
    for who, m in (("model", model), ("baseline", baseline)):
        V = None if m is None else getattr(m.config.get_text_config(), "vocab_size", None)
        if V is not None and top_id >= V:
            raise MoegraftError(
                f"token id {top_id} is outside the {who}'s vocabulary of {V}: model and baseline must "
                "share a tokenizer"
            )


# no_grad: the models' parameters require grad (a freshly loaded one does), and without it every forward here
# kept its autograd graph until the next batch: scoring the demo's 135M graft against dense peaked at 7.3 GB
# instead of 3.9 GB.
@torch.no_grad()
def _score(
    model: nn.Module,
    baseline: nn.Module | None,
    blocks: torch.Tensor,
    batch_size: int,
    device: str,
    progress: bool,
):
    """(LM metrics, routing statistics or None for a dense model) of `model` on blocks (N, T), against `baseline`."""
    N = len(blocks)
    moe = bool(router_modules(model))
    lm = LMAccumulator()
    routing = RoutingAccumulator() if moe else None
    tap = RouterTap(model, detach=True) if moe else None
    with Progress(N, "eval", enabled=progress) as bar:
        if tap is not None:
            tap.__enter__()
        try:
            for s in range(0, N, batch_size):
                x = blocks[s : s + batch_size].to(device)  # (B, T)
                logits = model(x, use_cache=False).logits  # (B, T, V)
                if tap is not None:
                    routing.update(tap.records)
                    tap.clear()
                base_logits = None if baseline is None else baseline(x, use_cache=False).logits  # (B, T, V)
                lm.update(x.cpu(), logits.cpu(), None if base_logits is None else base_logits.cpu())
                del logits, base_logits
                bar.advance(x.shape[0])
        finally:
            if tap is not None:
                tap.__exit__(None, None, None)
    return lm.result(), None if routing is None else routing.result()


def evaluate(
    model: nn.Module | str | Path,
    *,
    baseline: nn.Module | str | Path | None = None,
    data: str | Path | torch.Tensor = "stdlib:heldout",
    max_tokens: int = 8192,
    seq_len: int = 256,
    batch_size: int = 2,
    report_dir: str | Path | None = None,
    lm_eval_tasks: list[str] | str | None = None,
    lm_eval_limit: int | None = None,
    device: str = "cpu",
    tokenizer=None,
    progress: bool = False,
    retain_data: str | Path | torch.Tensor | None = None,
    dtype: str | torch.dtype = "auto",
) -> EvalResult:
    """Perplexity, KL(baseline ‖ model), top-1 agreement and router health on the same token blocks.

    Args:
        model: a loaded causal LM, or anything `load_causal_lm` accepts (dir, hub id, .gguf).
        baseline: the dense model to compare with (same tokenizer), or None.
        data: "stdlib:heldout" (embedded prose), a .txt/.jsonl/.parquet path or folder, a datasets name,
            or (N, T) token blocks.
        max_tokens: at most this many tokens are evaluated (whole blocks of `seq_len`).
        seq_len: T, tokens per block.
        batch_size: blocks per forward; bounds the logits held at once to batch_size·T·V per model.
        report_dir: write report.md, report.json and PNG plots there.
        lm_eval_tasks: lm-eval harness task names or local task YAML files (comma-separated string or list).
        lm_eval_limit: at most this many examples per lm-eval task.
        device: "auto" (a CUDA GPU if there is one), "cpu", "cuda", "cuda:N".
        tokenizer: needed when `model` is an object and `data` is text.
        dtype: weights dtype of the models eval loads: "auto" (bf16 on CUDA, fp32 on CPU: moegraft.device),
            "float32", "bfloat16", "float16". Log-probabilities are taken in fp32 whatever it is.
        retain_data: a second dataset (as `data`, same max_tokens and seq_len), e.g. other text than the model
            was trained on: perplexity, KL and agreement there show what it forgot.

    Returns:
        EvalResult; `.report_dir` is set when a report was written.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    device = str(dev)
    weights = default_dtype(dev) if dtype == "auto" else as_dtype(dtype)
    loads = not isinstance(model, nn.Module) or (baseline is not None and not isinstance(baseline, nn.Module))
    text = [d for d in (data, retain_data) if d is not None and not isinstance(d, torch.Tensor)]
    need_tok = tokenizer is None and (bool(text) or bool(lm_eval_tasks))
    model, tok, name = resolve_model(
        model, tokenizer=tokenizer, dtype=weights, device=device, with_tokenizer=need_tok
    )
    base_name = None
    if baseline is not None:
        baseline, _, base_name = resolve_model(baseline, dtype=weights, device=device, with_tokenizer=False)
    blocks = token_blocks(data, tok, seq_len=seq_len, max_tokens=max_tokens)  # (N, T)
    N, T = blocks.shape
    retain_blocks = (
        None
        if retain_data is None
        else token_blocks(retain_data, tok, seq_len=seq_len, max_tokens=max_tokens)  # (N', T)
    )
    _check_vocabulary(max(int(b.max()) for b in (blocks, retain_blocks) if b is not None), model, baseline)
    metrics, routing = _score(model, baseline, blocks, batch_size, device, progress)
    result = EvalResult(
        model=name,
        baseline=base_name,
        data=f"{N}×{T} token blocks" if isinstance(data, torch.Tensor) else str(data),
        blocks=N,
        seq_len=T,
        metrics=metrics,
        routing=routing,
        experts_impl=current_experts_impl(model),
        dtype=str(weights).removeprefix("torch.") if loads else None,
    )
    if retain_blocks is not None:
        result.retain_data = (
            f"{len(retain_blocks)}×{retain_blocks.shape[1]} token blocks"
            if isinstance(retain_data, torch.Tensor)
            else str(retain_data)
        )
        result.retain = lm_metrics(
            model, retain_blocks, baseline=baseline, batch_size=batch_size, device=device
        )
    if lm_eval_tasks:
        from moegraft.eval.harness import run_lm_eval

        if tok is None:
            raise MoegraftError("lm-eval needs a tokenizer: pass tokenizer=, or a model path that has one")
        result.lm_eval = {"model": run_lm_eval(model, tok, lm_eval_tasks, limit=lm_eval_limit, device=device)}
        if baseline is not None:
            result.lm_eval["baseline"] = run_lm_eval(
                baseline, tok, lm_eval_tasks, limit=lm_eval_limit, device=device
            )
    result.seconds = time.perf_counter() - t0
    if report_dir is not None:
        from moegraft.eval.report import write_report

        result.report_dir = write_report(result, report_dir)
    return result
