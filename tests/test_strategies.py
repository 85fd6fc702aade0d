"""The recipe's model preparations on their own (moegraft.train.strategies, moegraft.finetune.adapters), and the
named losses a logging window averages (moegraft.train.state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import build, byte_tokenizer, tiny_llama_config
from moegraft.finetune.adapters import DenseLora, LoraSize, PathwayLora, PathwayLoraFacts, lora_rank
from moegraft.finetune.spec import FinetuneSpec
from moegraft.models import load_causal_lm, parameters_by_pathway
from moegraft.train.state import Losses, StepResult, Window
from moegraft.train.strategies import Prepared, TrainPathways


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    from moegraft.config import GraftSpec
    from moegraft.convert import convert

    root = tmp_path_factory.mktemp("strategies")
    dense = build(tiny_llama_config(), root / "dense")
    byte_tokenizer().save_pretrained(dense)
    convert(str(dense), root / "moe", GraftSpec(num_experts=4, top_k=2, expert_size=32), progress=False)
    return root / "moe"


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_train_pathways_trains_exactly_the_named_pathways(moe):
    model, tok = load_causal_lm(moe)
    prepared = TrainPathways(("router",)).prepare(model, tok, moe)
    assert isinstance(prepared, Prepared) and prepared.model is model and prepared.facts is None
    assert trainable(model) == set(parameters_by_pathway(model)["router"]) != set()
    assert not TrainPathways(("router",)).adapter


def test_dense_lora_sizes_its_rank_to_the_target(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    per_rank = sum(m.in_features + m.out_features for m in linears)
    target = 3 * per_rank + per_rank // 3  # closest to rank 3
    prepared = DenseLora(target=target, base_name="the-base").prepare(model, None, tiny_llama)
    smallest = min(min(m.in_features, m.out_features) for m in linears)
    assert prepared.facts == LoraSize(rank=3, per_rank=per_rank, smallest=smallest)
    assert lora_rank(target, per_rank) == 3
    n = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
    assert n == 3 * per_rank and all("lora_" in name for name in trainable(prepared.model))
    assert prepared.model.peft_config["default"].base_model_name_or_path == "the-base"


def test_pathway_lora_reports_what_it_placed(moe):
    model, tok = load_causal_lm(moe)
    spec = FinetuneSpec.build(stages="dense,router", rank=2, alpha=4, data="stdlib:train", seq_len=32)
    prepared = PathwayLora(spec).prepare(model, tok, moe)
    facts = prepared.facts
    assert isinstance(facts, PathwayLoraFacts) and facts.experts is None and facts.live is None
    assert facts.targets.modules and facts.targets.parameters  # dense linears, bare (E, H) router weights
    assert facts.trainable == sum(p.numel() for p in prepared.model.parameters() if p.requires_grad) > 0
    assert prepared.model.peft_config["default"].base_model_name_or_path == str(moe.resolve())
    record = facts.record()
    assert record["trainable_params"] == facts.trainable
    assert record["target_modules"] == list(facts.targets.modules)


def test_window_averages_the_losses_by_name():
    window = Window()
    for loss in (1.0, 3.0):
        window.add(StepResult(Losses(loss, loss / 2, 0.0, 1.0, 0.5), False, {}, {}, tokens=8))
    assert window.mean() == Losses(loss=2.0, ce=1.0, kl=0.0, aux=1.0, z=0.5)
    assert window.steps == 2 and window.tokens == 16
    window.reset()
    assert window.steps == 0 and window.tokens == 0 and not window.sums.any()
