"""Streamed calibration: a skeleton filled from the source one layer at a time gives the numbers the whole
model loaded by transformers gives, bit for bit, and holds one layer's weights at a time."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Phi3Config

from conftest import build, tiny_llama_config
from moegraft.calibrate import ffn_inputs_by_layer
from moegraft.config import GraftSpec
from moegraft.convert import convert, resolve
from moegraft.errors import SourceError
from moegraft.init.calibrated import calibrate_graft
from moegraft.init.carve import CarvedLayer, carve_model
from moegraft.io.source import open_source
from moegraft.streamed import StreamedWeights, skeleton

CALIB = torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(3))  # (N, T)


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out |= {k: s.get_tensor(k) for k in s.keys()}  # noqa: SIM118
    return out


def loaded(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """Phi-3 stores q/k/v and gate/up fused: the skeleton must be filled from the stored keys."""
    cfg = Phi3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    return build(cfg, tmp_path_factory.mktemp("phi3") / "model")


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    return build(tiny_llama_config(), tmp_path_factory.mktemp("llama_bf16") / "model", dtype=torch.bfloat16)


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2", "tiny_mistral", "phi3", "llama_bf16"])
def test_streamed_carve_convert_equals_the_loaded_models_carve(request, tmp_path, monkeypatch, which):
    src = request.getfixturevalue(which)
    spec = GraftSpec(init="carve", num_experts=4, top_k=2, shared_size=32)  # sequential refit: the default
    config = json.loads((src / "config.json").read_text())
    fmt = resolve(config, spec).fmt
    dtype = torch.bfloat16 if which == "llama_bf16" else torch.float32
    # the reference: transformers' own model, loaded whole, carved in memory
    (whole,) = carve_model(loaded(src, dtype), CALIB, [fmt.spec], list(range(config["num_hidden_layers"])),
                           [fmt.zero_router_weight()], progress=False)  # fmt: skip
    assert any(c.down is not None for c in whole.values())  # the refit ran: the spill has something to hold
    ref = convert(str(src), tmp_path / "ref", spec, progress=False, calib_blocks=CALIB, carved=whole)
    spilled = []
    spill = CarvedLayer.spilled

    def spy(self, directory):
        out = spill(self, directory)
        spilled.append(out.down_file)
        return out

    monkeypatch.setattr(CarvedLayer, "spilled", spy)
    got = convert(str(src), tmp_path / "got", spec, progress=False, calib_blocks=CALIB)  # streamed, spilled
    assert sum(f is not None for f in spilled) == sum(c.down is not None for c in whole.values())
    a, b = tensors(ref.out), tensors(got.out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ref_record = json.loads((ref.out / "moegraft.json").read_text())
    got_record = json.loads((got.out / "moegraft.json").read_text())
    assert ref_record["carve"] == got_record["carve"]
    # the spilled down projections lived beside the output and are gone with the convert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got", "ref"]


def test_streamed_kmeans_router_equals_the_loaded_models(tiny_llama):
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, init="neurons")
    kw = dict(router_init="kmeans", score="softmax", progress=False)
    ref = calibrate_graft(loaded(tiny_llama), CALIB, spec, [0, 2], **kw)
    source = open_source(str(tiny_llama))
    model = skeleton(source.config, torch.float32)
    got = calibrate_graft(model, CALIB, spec, [0, 2], weights=StreamedWeights(model, source), **kw)
    assert ref.keys() == got.keys() == {0, 2}
    for i in ref:
        assert torch.equal(ref[i].router, got[i].router)
        assert torch.equal(ref[i].neurons, got[i].neurons)


def test_streamed_calibration_holds_one_layer_at_a_time(tiny_llama):
    source = open_source(str(tiny_llama))
    model = skeleton(source.config, torch.float32)
    assert all(p.is_meta for p in model.parameters())  # nothing read to build it
    held = []
    for i, X in ffn_inputs_by_layer(model, CALIB, progress=False, weights=StreamedWeights(model, source)):
        present = {n for n, p in model.named_parameters() if not p.is_meta}
        held.append(present)
        assert present == {f"model.layers.{i}.{n}" for n, _ in model.model.layers[i].named_parameters()}
        assert X.shape == (CALIB.numel(), model.config.hidden_size)
    assert len(held) == model.config.num_hidden_layers
    assert all(p.is_meta for p in model.parameters())  # and none once the pass ends


def test_a_checkpoint_missing_a_layer_tensor_fails_in_one_line(tmp_path, tiny_llama):
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    state = tensors(tiny_llama)
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, broken / "model.safetensors")
    model = skeleton(json.loads((broken / "config.json").read_text()), torch.float32)
    source = open_source(str(broken))
    with pytest.raises(SourceError, match=r"no tensor model\.layers\.1\.self_attn\.k_proj\.weight"):
        for _ in ffn_inputs_by_layer(model, CALIB, progress=False, weights=StreamedWeights(model, source)):
            pass


def test_convert_holds_glibcs_mmap_threshold_unless_the_user_set_one():
    # in a process of its own: the threshold is process-wide, and the test session should keep glibc's default
    def fixed(env: dict) -> str:
        code = "from moegraft.malloc import fix_mmap_threshold; print(fix_mmap_threshold())"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        return r.stdout.strip()

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if platform.libc_ver()[0] == "glibc":
        assert fixed(env) == "True"
    assert fixed(env | {"MALLOC_MMAP_THRESHOLD_": "65536"}) == "False"
