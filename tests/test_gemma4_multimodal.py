"""The real Gemma 4 checkpoint class, Gemma4ForConditionalGeneration (text + vision tower), through convert → train →
eval → finetune: text logits exact at conversion, the router trains, a dense-stage LoRA touches only the text dense
MLP, the vision tower is bit-identical in every output, and every output loads with AutoModelForImageTextToText."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from conftest import build, tiny_gemma4_multimodal_config
from moegraft import models
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import read_texts
from moegraft.eval.evaluate import evaluate
from moegraft.finetune import FinetuneSpec, finetune, lora_targets
from moegraft.models import load_causal_lm, parameters_by_pathway
from moegraft.train import TrainSpec, train
from tolerance import within

TOWER = ("vision_tower.", "embed_vision.")


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _tower(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in w.items() if any(t in k for t in TOWER)}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma4mm")
    # weights of std 0.2, as test_convert's Gemma 4 test: at 0.02 the MLP outputs are so small (rms 3e-3) that the
    # RMSNorm eps of the graft's extra norm (1e-6 against mean x² ~ 1e-5) moves the logits by far more than 1e-4
    dense = build(tiny_gemma4_multimodal_config(initializer_range=0.2), root / "dense")
    convert(
        str(dense),
        root / "moe",
        GraftSpec(num_experts=4, top_k=2, expert_size=32, calib_tokens=512),
        progress=False,
    )
    (root / "text.txt").write_text("\n\n".join(read_texts("stdlib:train")[:10]))
    common = dict(data=str(root / "text.txt"), seq_len=32, batch=2, steps=3, log_every=1, eval_blocks=2)
    trained = train(root / "moe", root / "run", TrainSpec(lr=1e-2, **common), progress=False).model_dir
    ft = finetune(trained, root / "ft", FinetuneSpec.build(stages="dense", rank=4, merge=True, lr=1e-2,
                  loss_mask="all", **common), progress=False)  # fmt: skip
    return {"root": root, "dense": dense, "moe": root / "moe", "trained": trained, "merged": ft.merged_dir}


@pytest.mark.tolerance
def test_convert_keeps_text_logits(pipeline):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = AutoModelForImageTextToText.from_pretrained(pipeline["dense"]).eval()(input_ids=ids).logits
        m = AutoModelForImageTextToText.from_pretrained(pipeline["moe"]).eval()(input_ids=ids).logits
    within(
        (m - d).abs().max() / d.abs().max(), 1e-4, "Gemma 4 multimodal graft vs dense, max |dlogit| / scale"
    )
    config = json.loads((pipeline["moe"] / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForConditionalGeneration"]
    assert config["text_config"]["enable_moe_block"] and config["vision_config"]


@pytest.mark.parametrize("stage", ["moe", "trained", "merged"])
def test_vision_tower_bit_identical_and_loads_natively(pipeline, stage):
    before, after = _tower(_weights(pipeline["dense"])), _tower(_weights(pipeline[stage]))
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model = AutoModelForImageTextToText.from_pretrained(pipeline[stage])
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    assert model.config.get_text_config().enable_moe_block


def test_pathways_cover_the_tower_and_it_stays_frozen(pipeline):
    model, _ = load_causal_lm(pipeline["moe"], with_tokenizer=False)
    by = parameters_by_pathway(model)  # raises if a parameter belongs to no pathway
    assert by["towers"] and all(any(t in n for t in TOWER) for n in by["towers"])
    text = [n for p, names in by.items() if p != "towers" for n in names]
    assert not any(any(t in n for t in TOWER) for n in text)
    assert len(by["towers"]) + len(text) == len(list(model.named_parameters()))
    # LoRA stages target the text model only (the tower has MLPs and attention of its own)
    targets = lora_targets(model, ("dense", "attention", "experts", "router"))
    assert targets.modules and not any(
        any(t in n for t in TOWER) for n in targets.modules + targets.parameters
    )


def test_train_moves_the_router_only_in_the_text_model(pipeline):
    before, after = _weights(pipeline["moe"]), _weights(pipeline["trained"])
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("router.proj.weight") for k in moved)
    model, _ = load_causal_lm(pipeline["moe"], with_tokenizer=False)
    by = parameters_by_pathway(model)
    assert moved <= set(by["router"]) | set(by["experts"])  # the default --trainable router,experts


def test_finetune_dense_merge_moves_only_text_dense_mlp(pipeline):
    before, after = _weights(pipeline["trained"]), _weights(pipeline["merged"])
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".language_model.layers." in k and ".mlp." in k for k in moved)


def test_eval_runs_on_the_multimodal_class(pipeline):
    res = evaluate(pipeline["trained"], baseline=pipeline["dense"], data=str(pipeline["root"] / "text.txt"),
                   max_tokens=256, seq_len=32)  # fmt: skip
    assert (
        res.routing and len(res.routing) == 4 and res.metrics.kl > 0 and res.metrics.baseline_perplexity > 0
    )


def test_experts_implementation_pin_reaches_the_text_config(pipeline, monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_EXPERTS_IMPL", "eager")
    model, _ = load_causal_lm(pipeline["moe"], with_tokenizer=False)
    assert model.config.get_text_config()._experts_implementation == "eager"
