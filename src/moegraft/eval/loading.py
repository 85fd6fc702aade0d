"""A model argument as eval and bench take it: a loaded model, or anything `load_causal_lm` accepts.

In: a model object or a source (dir, hub id, .gguf). Out: (model, tokenizer or None, display name).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moegraft.eval.experts import DEFAULT_EXPERTS_IMPL, set_experts_impl
from moegraft.models import load_causal_lm

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    from moegraft.errors import MoegraftError

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MoegraftError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model(
    model: nn.Module | str | Path,
    *,
    tokenizer=None,
    dtype: str | torch.dtype = torch.float32,
    device: str = "cpu",
    experts_impl: str | None = DEFAULT_EXPERTS_IMPL,
    with_tokenizer: bool = True,
):
    """(model in eval mode, tokenizer, name). A loaded model is used as it is (only moved to `device`).

    A loaded source gets `experts_impl` (MoE only); `with_tokenizer=False` skips the tokenizer (bench, baseline).
    """
    if isinstance(model, nn.Module):
        name = getattr(model, "name_or_path", "") or type(model).__name__
        return model.to(device).eval(), tokenizer, str(name)
    m, tok = load_causal_lm(model, dtype=as_dtype(dtype), device=device, with_tokenizer=with_tokenizer)
    if experts_impl is not None:
        set_experts_impl(m, experts_impl)
    return m, tokenizer if tokenizer is not None else tok, str(model)
