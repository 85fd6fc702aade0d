"""plan --train: training memory per GPU of the 52B-A36B graft of Gemma 4 31B, against a hand computation from
the config's numbers (written out here, not through plan's helpers), and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moegraft.cli import app
from moegraft.errors import SpecError
from moegraft.plan import EXAMPLE_52B_A36B
from moegraft.plan.training import plan_train

CONFIG = Path(__file__).parent.parent / "examples" / "configs" / "gemma-4-31B.config.json"
GIB = 2**30

# gemma-4-31B.config.json: the numbers the hand computation uses
V, H, I, L = 262144, 5376, 21504, 60
NQ, NKV, HD = 32, 16, 256  # sliding-attention layers (50 of them)
NKV_G, HD_G = 4, 512  # full-attention layers (10), attention_k_eq_v: no v_proj
N_FULL, N_SLIDING = 10, 50
E, K, IE = 16, 4, 1344  # the 52B-A36B graft, every layer


def hand() -> dict:
    """Every number from the config by hand: parameters per pathway, bytes, activations, GPUs."""
    attn_sliding = H * NQ * HD + 2 * H * NKV * HD + NQ * HD * H + 2 * HD  # q, k, v, o, q_norm, k_norm
    attn_full = H * NQ * HD_G + H * NKV_G * HD_G + NQ * HD_G * H + 2 * HD_G  # q, k (= v), o, norms
    router = E * H + H + E  # router.proj, router.scale, router.per_expert_scale
    experts = E * 2 * IE * H + E * H * IE + 2 * H  # gate_up_proj, down_proj, pre/post_feedforward_layernorm_2
    dense = 3 * H * I + H  # gate/up/down, post_feedforward_layernorm_1
    norms_layer = 4 * H  # input, post_attention, pre/post_feedforward layernorms
    params = {
        "embeddings": V * H,  # tied lm_head
        "attention": N_SLIDING * attn_sliding + N_FULL * attn_full,
        "router": L * router,
        "experts": L * experts,
        "dense": L * dense,
        "norms": L * norms_layer + H,  # + the final norm
    }
    trainable = params["router"] + params["experts"]
    frozen = sum(params.values()) - trainable
    sharded = 2 * frozen + (4 + 4 + 8) * trainable  # bf16 frozen; fp32 master + grad + 2 AdamW moments
    largest_layer = attn_full + dense + router + experts + norms_layer
    gathered = (V * H + 2 * largest_layer) * 2 + math.ceil(trainable / L) * 4
    tokens = 4096
    act_sliding = 4 * H + (H + 2 * NQ * HD + 2 * NKV * HD) + (H + 3 * I) + K * (H + 3 * IE)
    act_full = 4 * H + (H + 2 * NQ * HD_G + 2 * NKV_G * HD_G) + (H + 3 * I) + K * (H + 3 * IE)
    logits = tokens * V * 4 * 2
    act = tokens * (N_SLIDING * act_sliding + N_FULL * act_full) * 2 + logits
    act_ckpt = tokens * (L * H + max(act_sliding, act_full)) * 2 + logits
    gpus = next(n for n in range(2, 1000) if math.ceil(sharded / n) + gathered + act_ckpt <= 80 * GIB)
    return dict(
        params=params,
        trainable=trainable,
        frozen=frozen,
        sharded=sharded,
        gathered=gathered,
        act=act,
        act_ckpt=act_ckpt,
        gpus=gpus,
    )


def test_52b_a36b_training_memory_by_hand():
    want = hand()
    got = plan_train(json.loads(CONFIG.read_text()), EXAMPLE_52B_A36B, gpu_memory_gb=80)
    assert got.params == want["params"]
    assert got.trainable_params == want["trainable"] == 20_815_120_320
    assert got.frozen_params == want["frozen"]
    assert got.trainable_params + got.frozen_params == pytest.approx(51.51e9, rel=1e-3)  # plan's total
    # the frozen dense path costs weights only; the trainable experts 16 bytes a parameter
    assert got.weight_bytes == 2 * want["frozen"] + 4 * want["trainable"]
    assert got.grad_bytes == 4 * want["trainable"] and got.optimizer_bytes == 8 * want["trainable"]
    assert got.sharded_bytes == want["sharded"]
    assert got.gathered_bytes == want["gathered"]
    assert got.activation_bytes == want["act"] and got.activation_bytes_checkpointed == want["act_ckpt"]
    assert got.gpus_needed == want["gpus"] == 7
    # without checkpointing the activations alone exceed an 80 GiB GPU at 4096 tokens
    assert want["act"] > 80 * GIB and got.gpus_needed_no_checkpointing is None
    assert got.per_gpu_bytes(7) <= 80 * GIB < got.per_gpu_bytes(6)


def test_fp32_and_all_pathways_cost_more():
    cfg = json.loads(CONFIG.read_text())
    bf16 = plan_train(cfg, EXAMPLE_52B_A36B)
    fp32 = plan_train(cfg, EXAMPLE_52B_A36B, precision="fp32")
    assert fp32.weight_bytes - bf16.weight_bytes == 2 * bf16.frozen_params  # frozen at 4 bytes instead of 2
    dense_too = plan_train(cfg, EXAMPLE_52B_A36B, trainable=("router", "experts", "dense"))
    assert dense_too.optimizer_bytes - bf16.optimizer_bytes == 8 * bf16.params["dense"]
    with pytest.raises(SpecError, match="needs a MoE"):
        plan_train(cfg)
    with pytest.raises(SpecError, match="--trainable"):
        plan_train(cfg, EXAMPLE_52B_A36B, trainable=("bogus",))


def test_cli_plan_train():
    r = CliRunner().invoke(
        app, ["plan", str(CONFIG), "-E", "16", "-K", "4", "-I", "1344", "--train", "--gpu-memory", "80"]
    )
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "fits 80 GiB GPUs from 7 under FSDP" in text and "no optimizer state" in text
    r = CliRunner().invoke(
        app, ["plan", str(CONFIG), "-E", "16", "-K", "4", "-I", "1344", "--train", "--json"]
    )
    assert r.exit_code == 0 and json.loads(r.output)["train"]["gpus_needed"] == 7
