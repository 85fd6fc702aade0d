"""vLLM (CPU build, its own venv from scripts/vllm_venv.sh) serves what moegraft writes: greedy tokens identical
to transformers' and the chosen tokens' logprobs within fp32 rounding, for every output format vLLM has.

Tiny random models with head_dim 64 (vLLM's CPU attention refuses 16), experts trained a few steps so the routed
path is live, real prompts. All models go through one worker process (vLLM's import and engine start are slow).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3_5TextConfig, Qwen3Config

from conftest import build, byte_tokenizer, tiny_gemma4_config, tiny_llama_config
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import read_texts
from moegraft.export.check import hf_greedy
from moegraft.models import load_causal_lm
from moegraft.serve.parity import compare_continuations, prompt_ids
from moegraft.serve.vllm_runtime import default_python, vllm_greedy

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(default_python() is None, reason="no vLLM venv: bash scripts/vllm_venv.sh"),
]

N_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 32, 32
# |Δ logprob| of the chosen tokens, vLLM against transformers, both fp32: the two runtimes sum the same products
# in different orders (vLLM's CPU GEMMs, fused MoE and attention kernels), so the difference is fp32 rounding
# carried through the layers. Largest seen over the tiny models below: LOGPROB_SEEN; the bound is 10x that.
LOGPROB_SEEN = 1e-5
LOGPROB_TOL = 10 * LOGPROB_SEEN

H64 = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def dense_config(family: str):
    """A tiny dense model of `family` with head_dim 64, tied head (as SmolLM2 and Qwen3 0.6B-4B)."""
    if family == "llama":
        return tiny_llama_config(**H64, num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=True)
    if family == "qwen3":
        return Qwen3Config(
            vocab_size=256, **H64, head_dim=64, num_hidden_layers=2, max_position_embeddings=512,
            tie_word_embeddings=True,
        )  # fmt: skip
    if family == "gemma4":
        return tiny_gemma4_config(**H64, head_dim=64, global_head_dim=64, max_position_embeddings=512)
    if family == "qwen3_5":  # three Gated DeltaNet layers, then full attention (its default layer pattern)
        return Qwen3_5TextConfig(
            vocab_size=256, **H64, head_dim=64, num_hidden_layers=4, max_position_embeddings=512,
            linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
        )  # fmt: skip
    raise ValueError(family)


# graft name -> (dense family, --format)
GRAFTS = {
    "qwen2_moe/llama": ("llama", "qwen2_moe"),
    "glm4_moe/llama": ("llama", "glm4_moe"),
    "glm4_moe/qwen3": ("qwen3", "auto"),
    "gemma4/gemma4": ("gemma4", "auto"),
    "qwen3_5_moe/qwen3_5": ("qwen3_5", "auto"),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """graft name -> (trained MoE directory, vLLM's result), and the prompts, from one vLLM worker run."""
    from moegraft.train import TrainSpec, train

    root = tmp_path_factory.mktemp("vllm")
    text = root / "text.txt"
    text.write_text("\n\n".join(read_texts("stdlib:train")[:12]))
    dense: dict[str, Path] = {}
    dirs: dict[str, Path] = {}
    for name, (family, fmt) in GRAFTS.items():
        if family not in dense:
            dense[family] = build(dense_config(family), root / "dense" / family)
        spec = GraftSpec(num_experts=4, top_k=2, expert_size=64, format=fmt, calib_data=str(text), calib_tokens=512)
        moe = convert(str(dense[family]), root / "moe" / name, spec, progress=False).out
        # a few steps at a high rate: the routed experts' zero output path becomes live, so vLLM's fused MoE
        # (routing, top-k weights, expert GEMMs) is what the comparison tests, not only the dense part
        run = dict(data=str(text), seq_len=32, batch=2, steps=3, lr=1e-2, log_every=1, eval_blocks=2)
        dirs[name] = train(moe, root / "run" / name, TrainSpec(**run), progress=False).model_dir
    prompts = prompt_ids(byte_tokenizer(), "stdlib:heldout", N_PROMPTS, PROMPT_TOKENS)
    results = vllm_greedy(list(dirs.values()), prompts, NEW_TOKENS)
    return {name: (dirs[name], r) for name, r in zip(dirs, results, strict=True)}, prompts


def against_transformers(model_dir: Path, result: dict, prompts: list[list[int]]) -> tuple[int, int, float]:
    model, _ = load_causal_lm(model_dir, dtype=torch.float32, with_tokenizer=False)
    reference = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    return compare_continuations(model, prompts, reference, result["tokens"], result["logprobs"])


@pytest.mark.parametrize("name", list(GRAFTS))
def test_vllm_serves_the_graft_as_transformers_computes_it(served, name):
    by_name, prompts = served
    model_dir, result = by_name[name]
    assert "error" not in result, result["error"]
    same, total, worst = against_transformers(model_dir, result, prompts)
    print(f"PARITY {name}: greedy {same}/{total}, max dlogprob {worst:.3g}")
    assert (same, total) == (NEW_TOKENS * N_PROMPTS,) * 2, (name, same, total, worst)
    assert worst < LOGPROB_TOL, (name, worst)
