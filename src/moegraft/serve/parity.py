"""`moegraft parity`: greedy continuations of real prompts in each runtime, against transformers (fp32).

In: a checkpoint directory, text to cut prompts from, the runtimes to try. Out: per runtime, how many greedy
tokens match transformers' (each prompt counted up to its first divergence), the largest |Δ logprob| of the
tokens the runtime chose (transformers teacher-forced on the runtime's own continuation), llama.cpp's logit
check, or the one-line reason a runtime could not run the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moegraft.errors import MissingPackageError, MoegraftError, SourceError
from moegraft.serve.compare import RuntimeParity, compare_continuations
from moegraft.serve.spec import RUNTIMES

# the prefix of the architectures of moegraft's own Gemma 2/3 MoE class (formats/gemma_moe.py): transformers
# loads it from its modeling file; no other runtime has that architecture
OWN_CLASS_PREFIX = "Moegraft"


@dataclass(frozen=True)
class ParityReport:
    model: str
    architecture: str
    prompts: int
    prompt_tokens: int
    new_tokens: int
    data: str
    runtimes: list[RuntimeParity]

    def to_json(self) -> dict:
        return asdict(self)


def architecture_of(model_dir: Path) -> str:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise SourceError(
            f"{model_dir}: no config.json; parity runs a checkpoint directory (convert's output)"
        )
    return (json.loads(cfg_path.read_text()).get("architectures") or ["?"])[0]


def runtime_refusal(runtime: str, architecture: str) -> str | None:
    """Why `runtime` cannot serve `architecture` at all, known before trying; None where it may."""
    if runtime != "transformers" and architecture.startswith(OWN_CLASS_PREFIX):
        return (
            f"{architecture} is moegraft's own Gemma 2/3 MoE class (transformers loads it from its modeling "
            f"file); {runtime} has no such architecture: serve it with transformers"
        )
    return None


def prompt_ids(tokenizer, data: str, n_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """The first `prompt_tokens` tokens of each of the first `n_prompts` documents of `data` that are that long
    (distinct documents: prompts that share no text)."""
    from moegraft.data import read_texts

    prompts = []
    for text in read_texts(data):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == n_prompts:
            return prompts
    raise MoegraftError(
        f"{data}: only {len(prompts)} documents of >= {prompt_tokens} tokens, {n_prompts} prompts asked; "
        "use --prompts fewer or more text"
    )


def run_parity(
    model_dir: str | Path,
    *,
    runtimes: tuple[str, ...] = RUNTIMES,
    data: str = "stdlib:heldout",
    new_tokens: int = 32,
    n_prompts: int = 4,
    prompt_tokens: int = 32,
    vllm_python: str | Path | None = None,
    vllm_url: str | None = None,
    llama_check_tokens: int = 1024,
) -> ParityReport:
    """Run the same real-text prompts through each runtime and compare it with transformers (fp32).

    Args:
        model_dir: a checkpoint directory (what `convert`/`train` write, or a dense model).
        runtimes: any of "transformers", "vllm", "llama.cpp" (transformers is always the reference).
        data: text to cut the prompts from (what `moegraft eval --data` reads).
        vllm_python: a python that imports vllm (scripts/vllm_venv.sh builds one); default: that venv if built.
        vllm_url: an OpenAI-compatible vLLM server already serving `model_dir` (instead of vllm_python).
        llama_check_tokens: tokens of `data` scored for llama.cpp's logit and perplexity check.

    Returns:
        A ParityReport; a runtime that could not run carries its one-line reason instead of numbers.
    """
    from moegraft.export.check import hf_greedy
    from moegraft.models import load_causal_lm

    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise MoegraftError(f"unknown runtime {unknown[0]!r}; choose from {', '.join(RUNTIMES)}")
    model_dir = Path(model_dir).expanduser()
    arch = architecture_of(model_dir)
    model, tok = load_causal_lm(model_dir, dtype=torch.float32)
    prompts = prompt_ids(tok, data, n_prompts, prompt_tokens)
    reference = [hf_greedy(model, p, new_tokens) for p in prompts]
    rows = []
    for runtime in runtimes:
        if runtime == "transformers":  # the reference against itself: what "identical" looks like
            rows.append(
                RuntimeParity("transformers", new_tokens * len(prompts), new_tokens * len(prompts), 0.0)
            )
            continue
        why = runtime_refusal(runtime, arch)
        if why is not None:
            rows.append(RuntimeParity(runtime, reason=why))
        elif runtime == "vllm":
            from moegraft.serve.vllm_runtime import vllm_greedy

            try:
                got = vllm_greedy([model_dir], prompts, new_tokens, python=vllm_python, url=vllm_url)[0]
            except MissingPackageError as e:
                got = {"error": str(e)}
            if "error" in got:
                rows.append(RuntimeParity("vllm", reason=got["error"]))
            else:
                same, total, worst = compare_continuations(
                    model, prompts, reference, got["tokens"], got["logprobs"]
                )
                rows.append(RuntimeParity("vllm", same, total, worst, extra={"via": got.get("via", "")}))
        else:
            from moegraft.serve.llama_cpp_runtime import llama_cpp_parity

            rows.append(llama_cpp_parity(model_dir, model, tok, prompts, reference, data, llama_check_tokens))
    return ParityReport(str(model_dir), arch, len(prompts), prompt_tokens, new_tokens, data, rows)
