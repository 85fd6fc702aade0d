"""--precision: a bf16 graft trains under bf16 autocast, is saved in bf16 (every floating tensor) and loads natively;
the frozen path is bit-identical whatever the training precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import build, tiny_llama_config
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import read_texts
from moegraft.errors import SpecError
from moegraft.train import TrainSpec, train
from moegraft.train.precision import resolve_precision, upcast_trainable


@pytest.fixture(scope="module")
def bf16_graft(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("precision")
    dense = build(tiny_llama_config(), root / "dense")
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, dtype="bfloat16", calib_tokens=512)
    convert(str(dense), root / "moe", spec, progress=False)
    (root / "text.txt").write_text("\n\n".join(read_texts("stdlib:train")[:10]))
    return root


def _train(root: Path, name: str, precision: str):
    spec = TrainSpec(
        data=str(root / "text.txt"),
        seq_len=32,
        batch=2,
        steps=2,
        lr=1e-2,
        log_every=1,
        eval_blocks=2,
        precision=precision,
    )
    return train(root / "moe", root / name, spec, progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_graft_is_saved_in_bf16(bf16_graft, precision):
    res = _train(bf16_graft, f"run_{precision}", precision)
    before = load_file(bf16_graft / "moe" / "model.safetensors")
    after = load_file(res.model_dir / "model.safetensors")
    assert set(after) == set(before)
    assert {v.dtype for v in after.values() if v.is_floating_point()} == {torch.bfloat16}
    assert json.loads((res.model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    resolved = json.loads((res.run_dir / "moegraft-train.json").read_text())["resolved"]
    assert resolved["precision"] == precision
    # only the trainable pathways moved: routers and experts changed, everything else bit-identical
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("mlp.gate.weight") for k in moved)
    assert all(".mlp.gate." in k or ".mlp.experts." in k or "shared_expert_gate" in k for k in moved)
    # loads natively, in its own dtype
    model = AutoModelForCausalLM.from_pretrained(res.model_dir, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_resolve_precision(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` passes on
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(SpecError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


def test_upcast_trainable_only():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    lin.bias.requires_grad_(False)
    assert upcast_trainable(lin) == 1
    assert lin.weight.dtype == torch.float32 and lin.bias.dtype == torch.bfloat16
