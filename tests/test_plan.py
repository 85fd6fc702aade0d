"""plan: parameter counts must equal transformers' own models (built on the meta device), KV cache must
equal transformers' own cache, and the two real Gemma 4 configs must give their published sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Glm4MoeConfig,
    Qwen2MoeConfig,
)

from moegraft.config import GraftSpec
from moegraft.errors import SpecError, UnsupportedModelError
from moegraft.models import CACHE_ARG
from moegraft.plan import EXAMPLE_52B_A36B, SUPPORTED_TYPES, plan

# --- real configs: google/gemma-4-26B-A4B and google/gemma-4-31B, text part, as in
# transformers/models/gemma4/convert_gemma4_weights.py (head_dim/global_head_dim/vocab are the defaults
# there); shipped in examples/configs/ for `moegraft plan` and the README
_EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
GEMMA4_26B_A4B = json.loads((_EXAMPLES / "gemma-4-26B-A4B.config.json").read_text())
GEMMA4_31B = json.loads((_EXAMPLES / "gemma-4-31B.config.json").read_text())

# --- tiny configs that exercise every branch: GQA, biases, head_dim != H/heads, tied/untied, sliding
# windows, Gemma 4 per-layer inputs, kv-shared layers, double-wide MLP, k_eq_v with global heads
LLAMA = {
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
LLAMA_ODD = LLAMA | {"head_dim": 24, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}
MISTRAL = LLAMA | {"model_type": "mistral", "sliding_window": 8}
QWEN2 = LLAMA | {"model_type": "qwen2", "tie_word_embeddings": True}
QWEN2_MOE = LLAMA | {
    "model_type": "qwen2_moe",
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 48,
    "mlp_only_layers": [1],
    "qkv_bias": False,
}
GLM4_MOE = LLAMA | {
    "model_type": "glm4_moe",
    "head_dim": 20,
    "attention_bias": True,
    "use_qk_norm": True,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 2,
    "moe_intermediate_size": 16,
    "first_k_dense_replace": 1,
}
GEMMA4_TINY = {
    "model_type": "gemma4_text",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 6,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_global_key_value_heads": 1,
    "head_dim": 8,
    "global_head_dim": 16,
    "attention_k_eq_v": True,
    "attention_bias": True,
    "sliding_window": 8,
    "hidden_size_per_layer_input": 4,
    "vocab_size_per_layer_input": 80,
    "num_kv_shared_layers": 3,
    "use_double_wide_mlp": True,
    "tie_word_embeddings": False,
}
GEMMA4_TINY_MOE = GEMMA4_TINY | {
    "enable_moe_block": True,
    "num_experts": 4,
    "top_k_experts": 2,
    "moe_intermediate_size": 12,
}


def _hf(config: dict):
    return CONFIG_MAPPING[config["model_type"]].from_dict(
        {k: v for k, v in config.items() if k != "model_type"}
    )


def _meta_params(config) -> int:
    """Unique parameters of transformers' own model, built without memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "config",
    [
        LLAMA,
        LLAMA_ODD,
        MISTRAL,
        QWEN2,
        QWEN2_MOE,
        GLM4_MOE,
        GEMMA4_TINY,
        GEMMA4_TINY_MOE,
        GEMMA4_26B_A4B,
        GEMMA4_31B,
    ],
    ids=[
        "llama",
        "llama_bias",
        "mistral",
        "qwen2",
        "qwen2_moe",
        "glm4_moe",
        "gemma4",
        "gemma4_moe",
        "26B",
        "31B",
    ],
)
def test_total_equals_transformers(config):
    assert plan(config).dense.total_params == _meta_params(_hf(config))


def test_gemma4_multimodal_counts_text_only():
    text = {k: v for k, v in GEMMA4_TINY.items() if k not in ("model_type", "tie_word_embeddings")}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(cfg)
    text_params = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("model.language_model.", "lm_head."))
    )
    report = plan(cfg.to_dict())
    assert report.dense.total_params == text_params
    assert report.dense.architecture == "Gemma4ForConditionalGeneration"
    assert any("vision/audio towers" in n for n in report.notes)


# --- the graft: the MoE config convert would write, built by transformers, must match plan's MoE


def _qwen2_moe_of(dense: dict, spec: GraftSpec, unselected: list[int]) -> Qwen2MoeConfig:
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return Qwen2MoeConfig(
        **{k: dense[k] for k in keep},
        num_key_value_heads=dense["num_key_value_heads"],
        tie_word_embeddings=dense["tie_word_embeddings"],
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_size,
        shared_expert_intermediate_size=dense["intermediate_size"],
        mlp_only_layers=unselected,
        decoder_sparse_step=1,
        qkv_bias=True,
    )


@pytest.mark.parametrize("dense", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_graft_qwen2_moe_equals_transformers(dense):
    spec = GraftSpec(num_experts=6, top_k=2, expert_size=40, layers="0,2")
    report = plan(dense, spec)
    assert report.format == "qwen2_moe" and report.moe.moe_layers == 2
    assert report.moe.total_params == _meta_params(_qwen2_moe_of(dense, spec, unselected=[1]))
    # active = dense + 2 experts + router + shared_expert_gate per MoE layer (+ q/k/v biases Llama lacked)
    H = dense["hidden_size"]
    added_bias = 0 if dense is QWEN2 else 3 * (64 + 2 * 32)
    assert report.moe.active_params == report.dense.active_params + added_bias + 2 * (
        2 * 3 * H * 40 + 6 * H + H
    )


GLM_GRAFT = GraftSpec(num_experts=4, top_k=1, expert_size=40, layers="1-2", format="glm4_moe")


def _glm4_moe_of_llama() -> Glm4MoeConfig:
    """The GLM-4.5 MoE config convert writes for LLAMA under GLM_GRAFT."""
    return Glm4MoeConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attention_bias=False,
        use_qk_norm=False,
        partial_rotary_factor=1.0,
        n_routed_experts=4,
        num_experts_per_tok=1,
        moe_intermediate_size=40,
        n_shared_experts=160 // 40,  # the dense FFN split into shared experts
        first_k_dense_replace=1,
    )


def test_graft_glm4_moe_equals_transformers():
    spec = GLM_GRAFT
    report = plan(LLAMA, spec)
    assert report.moe.total_params == _meta_params(_glm4_moe_of_llama())
    with pytest.raises(SpecError, match="suffix"):
        plan(LLAMA, spec.model_copy(update={"layers": "0,2"}))
    with pytest.raises(SpecError, match="divide"):
        plan(LLAMA, spec.model_copy(update={"expert_size": 48}))


def test_graft_gemma4_equals_transformers():
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=12)
    report = plan(GEMMA4_TINY, spec)
    assert report.format == "gemma4"
    assert report.moe.total_params == _meta_params(_hf(GEMMA4_TINY_MOE))
    assert report.moe.total_params == plan(GEMMA4_TINY_MOE).dense.total_params
    assert report.moe.active_params == plan(GEMMA4_TINY_MOE).dense.active_params


# --- active parameters and FLOPs per token: what one token's forward through transformers' own model touches


def _eager(config) -> torch.nn.Module:
    """transformers' model for `config`, random, with eager attention and experts (plain matmuls that the FLOP
    counter sees; the eager experts run only the experts a token chose)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if any(type(m).__name__.endswith("Experts") for m in model.modules()):
        model.set_experts_implementation("eager")
    return model


def touched_params(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Parameters one token's forward reads: all of every module that ran (a shared weight once), but of the routed
    experts only those the router chose (from the expert indices each experts module received)."""
    ran, chosen, hooks = set(), {}, []

    def on_experts(mod, args, kwargs, _out):
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]  # (tokens, K)
        chosen[mod] = set(idx.flatten().tolist())

    for mod in model.modules():
        if not list(mod.parameters(recurse=False)):
            continue
        if type(mod).__name__.endswith("Experts"):
            hooks.append(mod.register_forward_hook(on_experts, with_kwargs=True))
        else:
            hooks.append(mod.register_forward_hook(lambda m, _a, _o: ran.add(m)))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    params = {id(p): p.numel() for m in ran for p in m.parameters(recurse=False)}
    n = sum(params.values())
    for mod, experts in chosen.items():
        E = mod.gate_up_proj.shape[0]  # (E, 2I, H): every parameter of the module is stacked per expert
        n += sum(p.numel() for p in mod.parameters(recurse=False)) * len(experts) // E
    return n


def decode_flops(model: torch.nn.Module, context: int) -> int:
    """FLOPs torch counts for decoding one token with `context` - 1 tokens already in the KV cache."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, 64, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).cache
        with FlopCounterMode(display=False) as counter:
            model(ids[:, -1:], cache=cache, use_cache=True)
    return counter.get_total_flops()


ORACLE = [LLAMA, LLAMA_ODD, MISTRAL, QWEN2, QWEN2_MOE, GLM4_MOE, GEMMA4_TINY, GEMMA4_TINY_MOE]


@pytest.mark.parametrize(
    "config",
    ORACLE,
    ids=["llama", "llama_bias", "mistral", "qwen2", "qwen2_moe", "glm4_moe", "gemma4", "gemma4_moe"],
)
def test_active_params_and_flops_are_what_one_token_runs(config):
    # an oracle independent of plan's formulas: hooks on a real forward, and torch's own FLOP counter; context 8
    # stays within every sliding window (the eager kernel would count masked keys past it)
    model = _eager(_hf(config))
    cost = plan(config, context=8).dense
    assert cost.active_params == touched_params(model, torch.tensor([[5]]))
    assert cost.flops_per_token == decode_flops(model, 8)


@pytest.mark.parametrize("fmt", ["qwen2_moe", "glm4_moe", "gemma4"])
def test_graft_active_params_and_flops_are_what_one_token_runs(fmt):
    if fmt == "qwen2_moe":
        spec = GraftSpec(num_experts=6, top_k=2, expert_size=40, layers="0,2")
        dense, moe_config = LLAMA, _qwen2_moe_of(LLAMA, spec, unselected=[1])
    elif fmt == "glm4_moe":
        spec, dense, moe_config = GLM_GRAFT, LLAMA, _glm4_moe_of_llama()
    else:
        spec, dense, moe_config = (
            GraftSpec(num_experts=4, top_k=2, expert_size=12),
            GEMMA4_TINY,
            _hf(GEMMA4_TINY_MOE),
        )
    model = _eager(moe_config)
    cost = plan(dense, spec, context=8).moe
    assert cost.active_params == touched_params(model, torch.tensor([[5]]))
    assert cost.flops_per_token == decode_flops(model, 8)


# --- KV cache: transformers' own DynamicCache after a forward of `T` tokens, counted at bf16


@pytest.mark.parametrize("config", [LLAMA, MISTRAL, GEMMA4_TINY], ids=["llama", "mistral", "gemma4"])
def test_kv_cache_equals_transformers(config):
    T, batch = 7, 2  # below the sliding window (8): transformers keeps window-1 tokens once past it
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf(config)).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 80, (batch, T)), use_cache=True)
    stored = sum(
        t.numel() for layer in out[CACHE_ARG].layers for t in (layer.keys, layer.values) if t is not None
    )
    assert plan(config, context=T, batch=batch).dense.kv_cache_bytes == 2 * stored


def test_kv_cache_caps_sliding_layers_and_skips_shared():
    # GEMMA4_TINY: 6 layers, last 3 kv-shared; own caches: 2 sliding (2 kv heads x 8), 1 full (1 kv head x 16)
    ctx = 1000
    want = 2 * 2 * (2 * (2 * 8 * 8) + 1 * 16 * ctx)  # bf16 x (K, V) x (sliding capped at 8 + full)
    assert plan(GEMMA4_TINY, context=ctx).dense.kv_cache_bytes == want


# --- the real models: published sizes, and the 52B-A36B graft of 31B


def test_gemma4_26b_a4b_is_25b_total_4b_active():
    report = plan(GEMMA4_26B_A4B)
    assert report.moe is None and report.dense.moe_layers == 30
    assert report.dense.total_params == pytest.approx(25.2e9, rel=0.03)
    assert report.dense.active_params == pytest.approx(3.8e9, rel=0.03)  # embedding table counted once
    assert report.dense.active_params_non_embedding < report.dense.active_params


def test_gemma4_31b_graft_is_52b_a36b():
    report = plan(GEMMA4_31B, EXAMPLE_52B_A36B, gpu_memory_gb=80)
    assert report.dense.total_params == pytest.approx(30.7e9, rel=0.01)
    assert report.moe.total_params == pytest.approx(52e9, rel=0.03)
    assert report.moe.active_params == pytest.approx(36e9, rel=0.03)
    r = report.ratios
    # memory follows total, compute follows active: the additive graft raises both, total much more
    assert r["total_params"] > 1.6 and 1.1 < r["active_params"] < 1.25 and r["flops_per_token"] > 1
    assert r["weight_bytes"] == pytest.approx(r["total_params"])
    assert report.moe.fits["bf16"] is False and report.moe.fits["int8"] is True


def test_context_beyond_max_positions_is_noted():
    report = plan(LLAMA | {"max_position_embeddings": 64}, context=100)
    assert any("exceeds max_position_embeddings 64" in n for n in report.notes)


def test_report_json_and_render():
    report = plan(GEMMA4_31B, EXAMPLE_52B_A36B, gpu_memory_gb=80)
    data = json.loads(json.dumps(report.to_json()))
    assert data["moe"]["weight_bytes"].keys() == {"fp32", "bf16", "int8", "int4"}
    assert data["spec"]["num_experts"] == 16 and data["ratios"]["total_params"] > 1
    console = Console(record=True, width=160)
    report.render(console)
    text = console.export_text()
    assert "MoE / dense" in text and "Memory follows total" in text and "Compute follows active" in text


# --- errors


def test_top_k_and_experts_errors_are_spec_errors():
    with pytest.raises(SpecError, match="top-k"):
        GraftSpec.build(num_experts=4, top_k=8)
    with pytest.raises(SpecError, match="experts"):
        GraftSpec.build(num_experts=0)
    with pytest.raises(SpecError, match="top-k"):
        plan(
            LLAMA,
            GraftSpec.model_construct(num_experts=4, top_k=8, expert_size=8, layers="all", format="auto"),
        )


def test_spec_errors():
    with pytest.raises(SpecError, match="already a MoE"):
        plan(GEMMA4_26B_A4B, GraftSpec())
    with pytest.raises(SpecError, match="already a MoE"):
        plan(QWEN2_MOE, GraftSpec())
    with pytest.raises(SpecError, match="--layers all"):
        plan(GEMMA4_TINY, GraftSpec(layers="0-2"))
    with pytest.raises(SpecError, match="--format"):
        plan(LLAMA, GraftSpec(format="gemma4"))
    with pytest.raises(SpecError, match="does not exist"):
        plan(LLAMA, GraftSpec(layers="5"))
    with pytest.raises(UnsupportedModelError, match="biases"):
        plan(LLAMA_ODD, GraftSpec())


def test_unknown_model_type():
    with pytest.raises(UnsupportedModelError) as e:
        plan({"model_type": "gpt2", "hidden_size": 64})  # phi3 is supported since the families issue
    msg = str(e.value)
    assert "\n" not in msg and all(t in msg for t in SUPPORTED_TYPES)


# --- every format, taught once: plan reads what the format class writes, so a new format needs no plan code


# a tiny dense config for every model_type some format converts; a format that adds a family adds one here
def _tiny_dense() -> dict[str, dict]:
    from test_families import family_config  # the new families' tiny configs, built by transformers

    families = {f: family_config(f).to_dict() for f in ("qwen3", "qwen3_5", "phi3", "gemma2", "gemma3")}
    return {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "gemma4_text": GEMMA4_TINY} | {
        c["model_type"]: c for c in families.values()
    }


TINY_DENSE = _tiny_dense()
# multimodal wrappers, counted text-only by test_gemma4_multimodal_counts_text_only (and Gemma 3's like Gemma 4's)
MULTIMODAL = ("gemma4", "gemma3")


def _format_cases():
    from moegraft.formats import FORMATS

    types = {t for f in FORMATS for t in f.dense_types if t not in MULTIMODAL}
    missing = types - TINY_DENSE.keys()
    assert not missing, f"add a tiny config to TINY_DENSE for {sorted(missing)}"
    # every format with every family it takes, where it holds the tiny model exactly (GLM refuses sliding windows)
    cases = [
        (f, t)
        for f in FORMATS
        for t in f.dense_types
        if t in types and f.unsupported_reason(TINY_DENSE[t]) is None
    ]
    assert {f for f, _ in cases} == set(FORMATS), "a format holds none of the tiny models"
    return cases


@pytest.mark.parametrize("fmt,model_type", _format_cases(), ids=lambda x: getattr(x, "name", x))
def test_plan_totals_follow_every_format(fmt, model_type):
    dense = TINY_DENSE[model_type]
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=16, format=fmt.name)
    report = plan(dense, spec)
    depth = dense["num_hidden_layers"]
    moe_config = fmt(dense, spec).moe_config(list(range(depth)), torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf(moe_config))
    total = sum(p.numel() for p in model.parameters())
    # routed experts: the fused (E, out, in) tensors of each layer's experts module, counted by their class
    experts = sum(
        p.numel()
        for m in model.modules()
        if type(m).__name__.endswith("Experts")
        for p in m.parameters(recurse=False)
    )
    assert report.format == fmt.name and report.moe.moe_layers == depth
    assert report.moe.total_params == total
    assert report.moe.active_params == total - experts + experts * spec.top_k // spec.num_experts
