"""Training FLOPs per token (plan.training.train_flops_per_token, what `train`'s MFU divides by) against torch's own
count of one forward + backward (torch.utils.flop_counter.FlopCounterMode) of transformers' models, for what
trains: the graft default, the carve's, attention, the experts alone; Qwen2-MoE, GLM-4.5 MoE and Gemma 4."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.models import parameters_by_pathway
from moegraft.plan.training import causal_keys, train_flops_per_token

B, T = 2, 16  # T = the tiny Gemma 4's sliding window: every layer sees all earlier keys


@pytest.fixture(scope="module")
def grafts(tmp_path_factory, tiny_llama, tiny_gemma4) -> dict:
    root = tmp_path_factory.mktemp("train_flops")
    # layer 0 stays dense: the first trainable layer is then a MoE one for the router/experts cases, and a dense
    # one (layer 0's plain MLP) where "dense" trains
    graft = dict(num_experts=4, top_k=2, expert_size=32, init="zero", router_init="random", layers="1,2")
    out = {fmt: convert(str(tiny_llama), root / fmt, GraftSpec(**graft, format=fmt), progress=False).out
           for fmt in ("qwen2_moe", "glm4_moe")}  # fmt: skip
    out["gemma4"] = convert(str(tiny_gemma4), root / "gemma4", GraftSpec(**{**graft, "layers": "all"}),
                            progress=False).out  # fmt: skip
    return out


@pytest.mark.parametrize(
    "fmt,trainable",
    [
        ("qwen2_moe", "router,experts"),
        ("glm4_moe", "router,experts"),
        ("gemma4", "router,experts"),
        ("qwen2_moe", "experts"),
        ("qwen2_moe", "router,experts,dense"),
        ("qwen2_moe", "attention"),
        ("gemma4", "attention,router"),
        ("gemma4", "experts"),
        ("qwen2_moe", "norms"),
    ],
)
def test_plan_counts_what_torch_counts(grafts, fmt, trainable):
    # eager attention and experts: every matmul is an mm/addmm/bmm the counter knows (it has no grouped_mm entry)
    model = AutoModelForCausalLM.from_pretrained(
        grafts[fmt], experts_implementation="eager", attn_implementation="eager"
    )
    names = {n for p in trainable.split(",") for n in parameters_by_pathway(model)[p]}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=x, labels=x).loss.backward()
    config = json.loads((grafts[fmt] / "config.json").read_text())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    flops = train_flops_per_token(config, shapes, T)
    # eager attention multiplies the whole T x T square and masks it; plan counts the causal keys a kernel needs
    square = T / flops.attention_keys
    as_eager = flops.per_token + (flops.forward_attention + flops.backward_attention) * (square - 1)
    # equal to the FLOP: both count 2·m·n per matmul row; plan knows which gradients autograd computes
    assert as_eager * B * T == counter.get_total_flops()
    assert flops.per_token > flops.forward  # something trains: a backward is counted


def test_causal_keys():
    assert causal_keys(4, None) == (1 + 2 + 3 + 4) / 4
    assert causal_keys(4, 2) == (1 + 2 + 2 + 2) / 4
    assert causal_keys(4, 8) == causal_keys(4, None)


def test_teacher_forward_and_nothing_trainable(grafts, tiny_llama):
    config = json.loads((grafts["qwen2_moe"] / "config.json").read_text())
    dense = json.loads((tiny_llama / "config.json").read_text())
    frozen = train_flops_per_token(config, {}, T)
    assert frozen.backward_activation == frozen.backward_attention == frozen.backward_weight == 0
    with_teacher = train_flops_per_token(config, {}, T, teacher_config=dense)
    assert with_teacher.teacher_forward == train_flops_per_token(dense, {}, T).forward > 0
