"""moegraft's experts forward equals transformers' own `eager` one: outputs and gradients (inputs, routing
weights, expert and router parameters), on each of its paths (picks: decode; grouped: training; per expert:
no-grad prefill), on the three native formats and a carved model, with top-k ties, one expert taken by every
token, and experts nobody picks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import moegraft.experts_impl as ei
from conftest import TEST_SEED
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.models import cached_forward
from tolerance import within

# the tiny MoEs: 4 experts, top-2; max_decode_picks(4, 2) == 2: T = 1 takes the picks path, T = 2 not
E, K = 4, 2


def assert_reordered(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """|a - b| ≤ 3e-5 × max |b|: fp32 sums taken in another order, nothing more. Through 3-4 layers and the head
    that is some ulps of fp32 (1.2e-7) on the largest value: seen up to 2.0e-6 (17 ulps, bench_tolerances.py)."""
    within((a - b).abs().max() / b.abs().max(), 3e-5, f"{what}, max |diff| / max |eager|")


def _randomise_moe(model: torch.nn.Module, seed: int = TEST_SEED) -> None:
    """A graft at init has zero expert outputs (and Gemma 4 a zero norm after them): nothing to compare.
    Random experts, routers and that norm make every term of the MoE count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts." in name or name.endswith(("mlp.gate.weight", "router.proj.weight")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "feedforward_layernorm_2" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tiny_llama, tiny_gemma4) -> dict:
    root = tmp_path_factory.mktemp("experts_impl")
    graft = dict(num_experts=E, top_k=K, expert_size=32, init="zero", router_init="random")
    out = {}
    for fmt in ("qwen2_moe", "glm4_moe"):
        out[fmt] = convert(str(tiny_llama), root / fmt, GraftSpec(**graft, format=fmt), progress=False).out
    out["gemma4"] = convert(str(tiny_gemma4), root / "gemma4", GraftSpec(**graft), progress=False).out
    calib = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))  # (N, T)
    carve = GraftSpec(init="carve", num_experts=E, top_k=K, shared_size=32)
    out["carve"] = convert(str(tiny_llama), root / "carve", carve, progress=False, calib_blocks=calib).out
    return out


def load(path, impl: str, dtype=torch.float32, randomise: bool = True):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=impl)
    if randomise:
        _randomise_moe(model)
    return model.eval()


FORMATS = ["qwen2_moe", "glm4_moe", "gemma4", "carve"]


def experts_modules(model) -> list[torch.nn.Module]:
    """The routed experts of every MoE layer (not GLM's `shared_experts`, a plain MLP)."""
    return [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter)]


def experts_of(model) -> torch.nn.Module:
    return experts_modules(model)[0]


def _routing(case: str, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index, top_k_weights) (T, K) as a router would return them."""
    if case == "random":
        probs = torch.randn(T, E, generator=g).softmax(-1)
    elif case == "ties":  # equal probabilities: topk breaks the tie, every token gets the same experts
        probs = torch.full((T, E), 1 / E)
    else:  # "one_expert": expert 3 first for every token, expert 0 never chosen
        probs = torch.tensor([0.0, 0.2, 0.3, 0.5]).expand(T, E) + 0.01 * torch.rand(T, E, generator=g)
    w, idx = probs.topk(K, dim=-1)
    return idx, w


def _run(fn, experts, x, idx, w, gy):
    """Output and gradients w.r.t. input, routing weights and the two expert parameters."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    experts.zero_grad()
    y = fn(experts, x, idx, w)
    (y * gy).sum().backward()
    return [y.detach(), x.grad, w.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()]


@pytest.mark.tolerance
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["random", "ties", "one_expert"])
@pytest.mark.parametrize("T", [1, 3, 40])
def test_both_paths_equal_eager_on_one_layer(moe_dirs, fmt, case, T):
    model = load(moe_dirs[fmt], "eager")
    experts = experts_of(model)
    eager = type(experts).forward.__wrapped__  # the class's own forward, before transformers' dispatch
    g = torch.Generator().manual_seed(T + TEST_SEED)
    x = torch.randn(T, experts.hidden_dim, generator=g)
    gy = torch.randn(T, experts.hidden_dim, generator=g)
    idx, w = _routing(case, T, g)
    ref = _run(eager, experts, x, idx, w, gy)
    for path in (ei.picks_forward, ei.grouped_forward, ei.per_expert_forward):
        got = _run(path, experts, x, idx, w, gy)
        for name, a, b in zip(("out", "d input", "d weights", "d gate_up", "d down"), got, ref, strict=True):
            assert_reordered(a, b, f"{path.__name__} {name}")
        assert got[4][idx.unique()].abs().sum() > 0  # the test can fail: chosen experts have gradients
    if case != "random":
        unused = sorted(set(range(E)) - set(idx.flatten().tolist()))
        assert unused and got[3][unused].abs().max() == 0 and got[4][unused].abs().max() == 0


def _model_run(model, ids, gl):
    """Logits and every parameter's gradient of one forward (no cache) with a fixed random loss."""
    model.zero_grad()
    logits = model(ids, use_cache=False).logits
    (logits * gl.to(logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


PATHS = ("picks_forward", "grouped_forward", "per_expert_forward")


def spy_paths(monkeypatch) -> dict[str, int]:
    """Counts the calls of each path of moegraft's forward."""
    calls = dict.fromkeys(PATHS, 0)
    for name in PATHS:
        real = getattr(ei, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(ei, name, spy)
    return calls


def _zero_router(model) -> None:
    """Equal router scores: top-k breaks the tie, every token takes the same K experts."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("mlp.gate.weight", "router.proj.weight")):
                p.zero_()


@pytest.mark.tolerance
@pytest.mark.parametrize("fmt", FORMATS)
# with gradients even a prefill-sized batch (4, 64) takes the grouped path
@pytest.mark.parametrize(
    "shape,path", [((1, 1), "picks_forward"), ((2, 12), "grouped_forward"), ((4, 64), "grouped_forward")]
)
@pytest.mark.parametrize("router", ["random", "ties"])
def test_model_logits_and_gradients_equal_eager(moe_dirs, monkeypatch, fmt, shape, path, router):
    models = [load(moe_dirs[fmt], "eager"), load(moe_dirs[fmt], "moegraft")]
    if router == "ties":
        for m in models:
            _zero_router(m)
    calls = spy_paths(monkeypatch)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, shape, generator=g)
    gl = torch.randn(*shape, 256, generator=g)
    (ref_logits, ref_grads), (logits, grads) = (_model_run(m, ids, gl) for m in models)
    n_moe = len(experts_modules(models[1]))
    assert calls == {p: n_moe if p == path else 0 for p in calls}  # every MoE layer took the path
    assert_reordered(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys()
    assert any("experts" in n and grads[n].abs().sum() > 0 for n in grads)
    # with one token, q and k get no gradient in exact arithmetic (softmax over one position): theirs is
    # rounding noise of the attention, with no scale to compare against
    zero = ("q_proj", "k_proj", "q_norm", "k_norm") if ids.shape[1] == 1 else ()
    failed = []
    for n in grads:
        err, scale = (grads[n] - ref_grads[n]).abs().max().item(), ref_grads[n].abs().max().item()
        if not any(z in n for z in zero) and err > 1e-5 * scale:
            failed.append(n)
    if failed:  # a sum that cancels (Gemma's per_expert_scale under ties): as accurate as eager, vs fp64
        truth64 = load(moe_dirs[fmt], "eager", dtype=torch.float64)
        if router == "ties":
            _zero_router(truth64)
        _, grads64 = _model_run(truth64, ids, gl)
        for n in failed:
            ours, theirs = ((x[n].double() - grads64[n]).abs().max().item() for x in (grads, ref_grads))
            # as accurate as eager: seen up to 0.96x eager's error; bound 8x
            within(ours, 8 * theirs, f"{n} gradient error vs fp64, bound 8x eager's")


@pytest.mark.tolerance
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("router", ["random", "ties"])
def test_no_grad_prefill_takes_the_per_expert_path_and_equals_eager(moe_dirs, monkeypatch, fmt, router):
    models = [load(moe_dirs[fmt], "eager"), load(moe_dirs[fmt], "moegraft")]
    if router == "ties":
        for m in models:
            _zero_router(m)
    calls = spy_paths(monkeypatch)
    ids = torch.randint(
        0, 256, (4, 64), generator=torch.Generator().manual_seed(5 + TEST_SEED)
    )  # T·K = 512 = 128 E
    with torch.no_grad():
        ref, got = (m(ids).logits for m in models)
    assert calls["per_expert_forward"] == len(experts_modules(models[1])) and calls["grouped_forward"] == 0
    assert_reordered(got, ref, "logits")


@pytest.mark.tolerance
@pytest.mark.parametrize("fmt", FORMATS)
def test_cached_decode_equals_eager(moe_dirs, fmt):
    """Prefill (grouped path) then decode steps through the KV cache (picks path), as `generate` runs them."""
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3 + TEST_SEED))
    runs = []
    for impl in ("eager", "moegraft"):
        model = load(moe_dirs[fmt], impl)
        with torch.no_grad():
            logits, cache = cached_forward(model, ids)
            steps = [logits]
            for _ in range(4):
                logits, cache = cached_forward(model, logits[:, -1:].argmax(-1), cache)
                steps.append(logits)
        runs.append(torch.cat(steps, dim=1))
    assert_reordered(runs[1], runs[0], "logits")


@pytest.mark.tolerance
def test_bf16_runs_and_stays_close_to_fp32(moe_dirs):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4 + TEST_SEED))
    fp32 = load(moe_dirs["glm4_moe"], "eager")  # GLM's router returns fp32 weights for bf16 states
    eager16 = load(moe_dirs["glm4_moe"], "eager", dtype=torch.bfloat16)
    model = load(moe_dirs["glm4_moe"], "moegraft", dtype=torch.bfloat16)
    with torch.no_grad():
        for x in (ids, ids[:1, :1]):  # the grouped path, then the picks path
            ref, ref16, got = fp32(x).logits, eager16(x).logits.float(), model(x).logits.float()
            scale = ref.abs().max()
            # a token whose router scores are closer than bf16 resolves may take another expert: the max
            # error is a routing flip's, so the mean is held to bf16 rounding, the max only to eager's bf16
            # bf16 rounding (eps 7.8e-3) through the layers: mean seen 0.66 eps x scale, bound 4 eps; the max as
            # eager's bf16 (seen up to 1.13x of it), bound 8x that or 0.05 x scale
            within(
                (got - ref).abs().mean() / scale,
                4 * torch.finfo(torch.bfloat16).eps,
                "bf16 vs fp32, mean |dlogit| / scale",
            )
            bound = max(8 * (ref16 - ref).abs().max(), 0.05 * scale)
            within((got - ref).abs().max(), bound, "bf16 vs fp32, max |dlogit| (bound 8x eager's bf16)")
    model.train()
    model(ids, labels=ids).loss.backward()  # backward runs in bf16
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n]
    assert grads and all(gr.dtype == torch.bfloat16 and torch.isfinite(gr).all() for gr in grads)


def test_defers_to_grouped_mm_for_other_layouts(moe_dirs, monkeypatch):
    model = load(moe_dirs["qwen2_moe"], "moegraft")
    seen = []
    monkeypatch.setattr(ei, "grouped_mm_experts_forward", lambda *a: seen.append(1) or a[1] * 0)
    experts = experts_of(model)
    x, idx = torch.randn(3, experts.hidden_dim), torch.zeros(3, K, dtype=torch.long)
    ei.moegraft_experts_forward(experts, x, idx, torch.ones(3, K))
    assert not seen
    experts.has_bias = True  # a layout none of the native formats has
    ei.moegraft_experts_forward(experts, x, idx, torch.ones(3, K))
    assert seen == [1]


def test_from_pretrained_after_import_moegraft(moe_dirs):
    """A fresh interpreter: `import moegraft` loads no torch, yet transformers then knows "moegraft"."""
    code = (
        "import sys\n"
        "import moegraft\n"
        "assert 'torch' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(moe_dirs['qwen2_moe'])!r}, experts_implementation='moegraft')\n"
        "assert m.config._experts_implementation == 'moegraft'\n"
        "import torch\n"
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "torch.Size([1, 3, 256])" in res.stdout


def test_moegraft_loads_moes_on_its_own_implementation(moe_dirs):
    from moegraft.eval.experts import CPU_EXPERTS_IMPLS, experts_impls
    from moegraft.models import DEFAULT_EXPERTS_IMPL, load_causal_lm

    model, _ = load_causal_lm(moe_dirs["gemma4"], with_tokenizer=False)
    assert DEFAULT_EXPERTS_IMPL == "moegraft" == model.config.get_text_config()._experts_implementation
    assert experts_impls(model) == CPU_EXPERTS_IMPLS and "grouped_mm" in CPU_EXPERTS_IMPLS


@pytest.mark.parametrize("deferred", [False, True], ids=["moegraft_grouped", "transformers_grouped_mm"])
def test_autocast_runs_expert_matmuls_in_bf16_with_fp32_master_weights(moe_dirs, monkeypatch, deferred):
    """train --precision bf16 holds trainable experts as fp32 master weights under autocast. transformers'
    grouped_mm casts the input to the weight's dtype, so there they computed in fp32 (the first assert shows it);
    moegraft's forward, on its own grouped path and where it defers to transformers' (on a GPU), computes exactly
    what bf16 weights and inputs compute, and the fp32 masters still get fp32 gradients."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    model = load(moe_dirs["qwen2_moe"], "moegraft")  # fp32: the master weights
    experts = experts_of(model)
    g = torch.Generator().manual_seed(5)
    T = 16  # T·K = 32 pairs: above the picks path, below the per-expert one: the grouped path
    x = torch.randn(T, experts.hidden_dim, generator=g)
    idx, w = _routing("random", T, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped_mm_experts_forward(experts, x, idx, w).dtype == torch.float32  # the fp32 matmuls
    if deferred:  # the path a CUDA device takes: transformers' grouped_mm behind moegraft's cast
        monkeypatch.setattr(ei, "_plain_layout", lambda _e: False)
    experts.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ei.moegraft_experts_forward(experts, x, idx, w)
    ref_experts = experts_of(load(moe_dirs["qwen2_moe"], "moegraft", dtype=torch.bfloat16))
    with torch.no_grad():
        forward = grouped_mm_experts_forward if deferred else ei.grouped_forward
        ref = forward(ref_experts, x.bfloat16(), idx, w)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref)  # the same bf16 ops on the same bf16 values
    got.float().sum().backward()
    grads = [experts.gate_up_proj.grad, experts.down_proj.grad]
    assert all(gr is not None and gr.dtype == torch.float32 and gr.abs().sum() > 0 for gr in grads)


@pytest.mark.parametrize("fmt", FORMATS)
def test_static_cache_prefill_and_decode_compile_to_one_graph(moe_dirs, fmt):
    """`bench --compile` on CUDA replays each step as one CUDA graph ("reduce-overhead"): a graph break (a
    `.tolist()`, a data-dependent shape) would split it, and a host read would force a sync every layer. Under
    dynamo "moegraft" defers to transformers' grouped_mm, which has neither; this traces a prefill and a
    decode step of each format (the carve's shared expert and gate included) and fails on any break."""
    from transformers import StaticCache

    from moegraft.models import CACHE_ARG

    model = load(moe_dirs[fmt], "moegraft")
    cache = StaticCache(config=model.config, max_cache_len=8)
    with torch.no_grad():
        # allocate the cache eagerly, as CompiledDecoder.start does (allocated inside the trace, it is part of it)
        model(
            input_ids=torch.zeros(2, 1, dtype=torch.long),
            use_cache=True,
            cache_position=torch.arange(1),
            **{CACHE_ARG: cache},
        )
        cache.reset()
        for t0, t in ((0, 4), (4, 1)):  # prefill 4 tokens (grouped outside dynamo), then one (picks)
            ids = torch.randint(0, 256, (2, t), generator=torch.Generator().manual_seed(t))  # (B, t)
            pos = torch.arange(t0, t0 + t)  # (t,)
            torch._dynamo.reset()
            seen = torch._dynamo.explain(model.forward)(
                input_ids=ids, use_cache=True, cache_position=pos, **{CACHE_ARG: cache}
            )
            reasons = [str(b.reason)[:200] for b in seen.break_reasons]
            assert (seen.graph_count, seen.graph_break_count) == (1, 0), f"{fmt}, {t} tokens: {reasons}"
    torch._dynamo.reset()
