"""llama.cpp's side of `moegraft parity`: `moegraft export` writes an f32 GGUF into a temporary directory,
then export's own checks run on it (logits on real text, perplexity) beside greedy on the parity prompts.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from moegraft.errors import MoegraftError, missing_package
from moegraft.serve.compare import RuntimeParity, compare_continuations


def llama_cpp_parity(
    model_dir: Path,
    model,
    tokenizer,
    prompts: list[list[int]],
    reference: list[list[int]],
    data: str,
    check_tokens: int,
) -> RuntimeParity:
    """llama.cpp against the transformers `model` already loaded from `model_dir` (fp32, f32 KV cache)."""
    try:
        from moegraft.export import export_gguf
        from moegraft.export.check import check_gguf, check_perplexity, llama_greedy, prose_ids
        from moegraft.export.dense import DenseGGUF
        from moegraft.export.llama_cpp import open_llama
    except ModuleNotFoundError as e:
        return RuntimeParity("llama.cpp", reason=str(missing_package(e)))
    n = len(reference[0])
    with tempfile.TemporaryDirectory(prefix="moegraft-parity-") as tmp:
        gguf = Path(tmp) / "model.gguf"
        try:
            # a dense model (the base a graft came from) goes through export's --dense path
            dense = (
                json.loads((model_dir / "config.json").read_text()).get("model_type") in DenseGGUF.model_types
            )
            export_gguf(model_dir, gguf, outtype="f32", dense=dense)
        except ModuleNotFoundError as e:
            return RuntimeParity("llama.cpp", reason=str(missing_package(e)))
        except MoegraftError as e:  # export's own refusal: the format has no exact llama.cpp form
            return RuntimeParity("llama.cpp", reason=str(e))
        V = model.get_output_embeddings().weight.shape[0]  # llama.cpp may pad its vocabulary past it
        llm = open_llama(gguf, n_ctx=max(len(p) for p in prompts) + n + 8)
        try:
            got = [llama_greedy(llm, p, n) for p in prompts]
            # the same Δ logprob as vLLM's, from llama.cpp's own logits along its own continuation
            logprobs = [_llama_logprobs(llm, p, g, V) for p, g in zip(prompts, got, strict=True)]
        finally:
            llm.close()
        same, total, worst = compare_continuations(model, prompts, reference, got, logprobs)
        ids = prose_ids(tokenizer, check_tokens, data)
        logits = check_gguf(model_dir, gguf, ids=ids)
        ppl = check_perplexity(model_dir, gguf, data, max_tokens=check_tokens)
    return RuntimeParity(
        "llama.cpp",
        same,
        total,
        worst,
        logits.max_abs_dlogit,
        extra={"perplexity": ppl.to_json(), "argmax_agreement": logits.argmax_agreement},
    )


def _llama_logprobs(llm, prompt: list[int], continuation: list[int], V: int) -> list[float]:
    """log p(continuation[i] | ...) from llama.cpp's logits, teacher-forced on prompt + continuation."""
    import numpy as np

    ids = prompt + continuation
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[len(prompt) - 1 : len(ids) - 1, :V], dtype=np.float64)  # (N, V)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # (N, V)
    return [float(logp[i, t]) for i, t in enumerate(continuation)]
