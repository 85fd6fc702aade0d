"""moegraft.finetune on tiny converted models: targeting by pathway, merge equivalence, adapter round trip,
expert selection, and the assistant-only loss mask."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import byte_tokenizer, compiled_graphs, tiny_moe_tree, tiny_moe_tree_deeper
from moegraft.cli import app
from moegraft.data import assistant_mask, pack, pack_masked, read_texts
from moegraft.errors import SpecError
from moegraft.finetune import FinetuneSpec, finetune, load_adapter, lora_targets
from moegraft.finetune.recipe import routing_counts, select_experts
from moegraft.formats import format_of_moe
from moegraft.models import load_causal_lm, pathway_of
from moegraft.routing import router_modules
from moegraft.train.loop import next_token_loss
from moegraft.train.metrics import read_metrics
from tolerance import close, within

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Eleven."},
]


def chat_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tiny_moe_tree(tmp_path_factory.mktemp("finetune"), chat_tokenizer(), docs=12)


def run(work: Path, name: str, stages: str, **kw):
    base = dict(
        data=str(work / "text.txt"), seq_len=32, batch=2, steps=3, lr=1e-2, log_every=1, eval_blocks=2
    )
    spec = FinetuneSpec.build(stages=stages, rank=4, alpha=8, merge=True, **{**base, **kw})
    return finetune(work / "qwen2_moe", work / name, spec, progress=False, overwrite=True)


def weights(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def base_weights(work):
    return weights(work / "qwen2_moe")


# -- targeting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["qwen2_moe", "glm4_moe", "gemma4"])
def test_targets_follow_the_pathway_map(work, fmt):
    model, _ = load_causal_lm(work / fmt, with_tokenizer=False)
    patterns = format_of_moe(model.config.to_dict()).pathways()
    for stage in ("dense", "experts", "router", "attention"):
        t = lora_targets(model, (stage,))
        assert t.modules or t.parameters, stage
        for m in t.modules:
            assert pathway_of(f"{m}.weight", patterns) == stage
        for p in t.parameters:
            assert pathway_of(p, patterns) == stage
    experts = lora_targets(model, ("experts",))
    assert experts.experts == experts.parameters and all(
        p.endswith(("experts.gate_up_proj", "experts.down_proj")) for p in experts.parameters
    )


# -- each stage changes only its pathway ---------------------------------------------------------


@pytest.mark.parametrize("stage", ["dense", "experts", "router", "attention"])
def test_stage_changes_only_its_pathway(work, base_weights, stage):
    res = run(work, f"run_{stage}", stage)
    patterns = format_of_moe(json.loads((work / "qwen2_moe" / "config.json").read_text())).pathways()
    # the adapter holds LoRA factors of this pathway's modules only, and every B moved off its zero init
    adapter = load_file(res.adapter_dir / "adapter_model.safetensors")
    assert adapter
    for k, v in adapter.items():
        module = k.removeprefix("base_model.model.").split(".lora_")[0]
        assert pathway_of(module + ".weight", patterns) == stage or pathway_of(module, patterns) == stage, k
        if ".lora_B." in k:
            assert v.abs().max() > 0, k
    # the merged model differs from the base exactly on this pathway; the rest is bit-identical
    after = weights(res.merged_dir)
    changed = {k for k in base_weights if not torch.equal(base_weights[k], after[k])}
    assert changed
    assert all(pathway_of(k, patterns) == stage for k in changed), changed
    # the base weights inside the trained PEFT model are untouched
    peft_model, _ = load_adapter(res.adapter_dir, merge=False, with_tokenizer=False)
    for k, v in peft_model.get_base_model().state_dict().items():
        if "lora_" not in k:
            key = k.replace(".base_layer", "")
            assert torch.equal(v, base_weights[key]), k


def test_balance_losses_only_with_the_router():
    assert FinetuneSpec.build(stages="dense,experts").train.balance == "none"
    assert FinetuneSpec.build(stages="dense,experts").train.z_coef == 0
    assert FinetuneSpec.build(stages="router").train.balance == "aux"
    with pytest.raises(SpecError, match="experts stage"):
        FinetuneSpec.build(stages="dense", experts_select="top-used:2")
    with pytest.raises(SpecError):
        FinetuneSpec.build(stages="dense,mlp")
    with pytest.raises(SpecError, match="selection bias"):
        FinetuneSpec.build(stages="router", balance="bias")


# -- merge and round trip -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_run(work):
    return run(work, "run_all", "dense,experts,router,attention")


@pytest.mark.tolerance
def test_merged_logits_equal_adapter_logits(work, all_run, tokens):
    adapted, _ = load_adapter(all_run.adapter_dir, merge=False, with_tokenizer=False)
    merged = AutoModelForCausalLM.from_pretrained(all_run.merged_dir, dtype=torch.float32).eval()
    base, _ = load_causal_lm(work / "qwen2_moe", with_tokenizer=False)
    with torch.no_grad():
        a = adapted(input_ids=tokens).logits
        m = merged(input_ids=tokens).logits
        b = base(input_ids=tokens).logits
        e, _ = load_causal_lm(all_run.adapter_dir, with_tokenizer=False)  # what `moegraft eval` loads
        c = e(input_ids=tokens).logits
    assert (a - b).abs().max() > 1e-3  # the adapter does something
    within((m - a).abs().max(), 1e-4, "merged vs adapter logits, max |d|")
    within((c - a).abs().max(), 1e-4, "adapter loaded by eval vs adapter logits, max |d|")


@pytest.mark.tolerance
@pytest.mark.parametrize("fmt", ["gemma4", "glm4_moe"])
def test_every_format_merges_to_the_adapted_function(work, fmt, tokens):
    spec = FinetuneSpec.build(
        stages="dense,experts,router,attention",
        rank=2,
        merge=True,
        data=str(work / "text.txt"),
        seq_len=32,
        batch=2,
        steps=2,
        lr=1e-2,
        eval_blocks=2,
    )
    res = finetune(work / fmt, work / f"run_{fmt}", spec, progress=False, overwrite=True)
    adapted, _ = load_adapter(res.adapter_dir, merge=False, with_tokenizer=False)
    merged = AutoModelForCausalLM.from_pretrained(res.merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(work / fmt, dtype=torch.float32).eval()
    with torch.no_grad():
        a, m, b = (x(input_ids=tokens).logits for x in (adapted, merged, base))
    assert (a - b).abs().max() > 1e-3
    within((m - a).abs().max(), 1e-4, f"{fmt} merged vs adapter logits, max |d|")


# plain PEFT, as a user loads the adapter: PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`
# (moegraft's own loads filter that warning: models.peft_calls)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_adapter_loads_back_with_peft(work, all_run):
    base = AutoModelForCausalLM.from_pretrained(work / "qwen2_moe", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(all_run.adapter_dir))
    saved = load_file(all_run.adapter_dir / "adapter_model.safetensors")
    state = model.state_dict()
    for k, v in saved.items():
        loaded = state[k.replace(".weight", ".default.weight")]
        assert torch.equal(loaded, v), k
    cfg = json.loads((all_run.adapter_dir / "adapter_config.json").read_text())
    assert cfg["target_parameters"] and cfg["target_modules"]
    assert Path(cfg["base_model_name_or_path"]) == (work / "qwen2_moe").resolve()
    # the balance losses saw the adapted router (the tap sits on the module that runs)
    taps = router_modules(model)
    assert all("base_layer" in n for n, mod in model.named_modules() for t in taps.values() if mod is t[0])


def test_next_stage_trains_on_the_merged_model(work, all_run):
    spec = FinetuneSpec.build(
        stages="experts", rank=2, data=str(work / "text.txt"), seq_len=32, batch=2, steps=1, eval_blocks=2
    )
    res = finetune(all_run.merged_dir, work / "run_next", spec, progress=False, overwrite=True)
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == all_run.merged_dir.resolve()
    with pytest.raises(SpecError, match="adapter"):
        finetune(all_run.adapter_dir, work / "run_bad", spec, progress=False)


# -- expert selection ---------------------------------------------------------------------------


def test_experts_select_ids_trains_only_those_experts(work, base_weights):
    res = run(work, "run_sel", "experts", experts_select="1,2")
    assert res.experts == {i: [1, 2] for i in range(3)}
    after = weights(res.merged_dir)
    for k in base_weights:
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            d = (after[k] - base_weights[k]).flatten(1).abs().amax(1)  # (E,)
            assert d[0] == 0 and d[3] == 0 and d[1] > 0 and d[2] > 0, (k, d)
        else:
            assert torch.equal(after[k], base_weights[k]), k


def test_top_used_picks_the_most_routed(work):
    model, tok = load_causal_lm(work / "qwen2_moe")
    spec = FinetuneSpec.build(
        stages="experts", experts_select="top-used:2", data=str(work / "text.txt"), seq_len=32
    )
    targets = lora_targets(model, ("experts",))
    chosen = select_experts(spec.experts_select, model, tok, spec, targets)
    counts = routing_counts(model, pack(read_texts(str(work / "text.txt")), tok, 32, max_blocks=16), 4)
    for layer, ids in chosen.items():
        second = counts[layer].sort(descending=True).values[1]
        assert len(ids) == 2 and (counts[layer][ids] >= second).all(), (layer, ids, counts[layer])


def test_top_used_from_an_eval_report(work, tmp_path):
    model, tok = load_causal_lm(work / "qwen2_moe")
    fractions = {0: [0.1, 0.4, 0.2, 0.3], 1: [0.5, 0.1, 0.1, 0.3], 2: [0.2, 0.3, 0.4, 0.1]}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"routing": [{"layer": k, "fractions": v} for k, v in fractions.items()]}))
    spec = FinetuneSpec.build(stages="experts", experts_select=f"top-used:2@{report}")
    chosen = select_experts(spec.experts_select, model, tok, spec, lora_targets(model, ("experts",)))
    assert chosen == {0: [1, 3], 1: [0, 3], 2: [1, 2]}


@pytest.mark.tolerance
def test_resume_reproduces_uninterrupted_run(work):
    kw = dict(steps=4, save_every=2, dropout=0.0)
    full = run(work, "run_full4", "dense", **kw)

    def stop(row):
        if row["step"] == 2:
            raise KeyboardInterrupt

    spec = FinetuneSpec.build(
        stages="dense",
        rank=4,
        alpha=8,
        merge=True,
        data=str(work / "text.txt"),
        seq_len=32,
        batch=2,
        lr=1e-2,
        log_every=1,
        eval_blocks=2,
        **kw,
    )
    with pytest.raises(KeyboardInterrupt):
        finetune(work / "qwen2_moe", work / "run_cut", spec, progress=False, overwrite=True, callback=stop)
    res = finetune(work / "qwen2_moe", work / "run_cut", spec, progress=False, resume=True)
    a = load_file(full.adapter_dir / "adapter_model.safetensors")
    b = load_file(res.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        within((a[k] - b[k]).abs().max(), 1e-6, "resumed vs uninterrupted adapter weight, max |d|")


# -- chat data: loss on assistant tokens only ---------------------------------------------------


def test_assistant_mask_marks_exactly_the_assistant_turns():
    tok = chat_tokenizer()
    ids, mask = assistant_mask(CHAT, tok)
    assert ids == tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    kept = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert kept == "Seven.</s>Eleven.</s>"
    dropped = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert dropped == "<system>Be brief.</s><user>Name a prime.</s><assistant><user>Another?</s><assistant>"


def test_masked_loss_counts_only_assistant_targets(tmp_path):
    tok = chat_tokenizer()
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(4)) + "\n")
    docs = read_texts(path, tokenizer=tok, keep_messages=True)
    ids, mask = pack_masked(docs, tok, 16)  # (N, T) each
    ids1, mask1 = assistant_mask(CHAT, tok)
    full_ids = (ids1 + [tok.eos_token_id]) * 4
    full_mask = (mask1 + [False]) * 4  # the EOS after a chat is not a target
    assert ids.flatten().tolist() == full_ids[: ids.numel()]
    assert mask.flatten().tolist() == full_mask[: ids.numel()]
    logits = torch.randn(*ids.shape, 256)
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
    )
    m = mask[:, 1:].flatten()
    torch.testing.assert_close(next_token_loss(logits, ids, mask), per_token[m].mean())


def test_a_micro_batch_without_targets_adds_no_loss_and_no_gradient():
    logits = torch.randn(2, 8, 16, requires_grad=True)
    loss = next_token_loss(logits, torch.randint(0, 16, (2, 8)), torch.zeros(2, 8, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and not logits.grad.any()  # not NaN: the step's other micro-batches still count


def test_cli_finetune_on_chat_jsonl(work, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(30)) + "\n")
    out = tmp_path / "ft"
    argv = ["finetune", str(work / "qwen2_moe"), str(out), "--data", str(path), "--stage", "dense"]
    argv += ["--steps", "2", "--seq-len", "32", "--batch", "2", "--rank", "2", "--quiet", "--device", "cpu"]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    assert "fine-tuned dense" in r.output
    assert (out / "model" / "adapter_model.safetensors").is_file()
    doc = json.loads((out / "moegraft-finetune.json").read_text())
    assert doc["spec"]["train"]["loss_mask"] == "assistant" and doc["resolved"]["target_modules"]
    bad = CliRunner().invoke(app, [*argv[:2], str(tmp_path / "bad"), *argv[3:5], "--stage", "mlp"])
    assert bad.exit_code == 2 and "mlp" in bad.output


@pytest.mark.tolerance
def test_lora_recovery_of_a_carve_distils_from_the_dense_model(work):
    """CMoE-style recovery: LoRA on the carve's shared part (dense stage), KL from the dense model only."""
    from moegraft.config import GraftSpec
    from moegraft.convert import convert
    from moegraft.train.metrics import read_metrics

    carve = GraftSpec(init="carve", num_experts=4, top_k=1, shared_size=32, calib_data=str(work / "text.txt"))
    carved = convert(str(work / "dense"), work / "carved", carve, progress=False).out
    base = dict(
        data=str(work / "text.txt"), seq_len=32, batch=2, steps=3, lr=1e-2, log_every=1, eval_blocks=2
    )
    spec = FinetuneSpec.build(stages="dense", rank=4, alpha=8, distill=str(work / "dense"), **base)
    res = finetune(carved, work / "carve_lora", spec, progress=False, overwrite=True)
    rows = [r for r in read_metrics(res.train.run_dir / "metrics.jsonl") if "loss" in r]
    assert rows and all(r["kl"] > 0 for r in rows)
    for r in rows:
        close(r["loss"], r["kl"], rel=1e-5, what="logged loss vs its KL term (distillation only)")
    saved = json.loads((res.train.run_dir / "moegraft-train.json").read_text())["spec"]
    assert saved["ce_weight"] == 0.0 and saved["distill"] == str(work / "dense")


def test_peft_calls_are_quiet_about_peft_s_own_deprecated_reads():
    """PEFT reads transformers' deprecated `is_gradient_checkpointing`, and finds no config to check the
    vocabulary against on a GGUF base; neither names anything a user can change, so moegraft's PEFT calls keep
    them out of the output (and nothing else)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from moegraft.models import peft_calls

    def wrap(ctx):
        model = LlamaForCausalLM(tiny_llama_config())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with ctx:
                get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
                warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
                # what PEFT's save_pretrained says on a GGUF base (peft/utils/save_and_load.py)
                warnings.warn(
                    "Could not find a config file in /m/x.gguf - will assume that the vocabulary was not modified.",
                    UserWarning,
                    stacklevel=1,
                )
        return [str(w.message) for w in seen]

    raw = wrap(contextlib.nullcontext())
    if not any("is_gradient_checkpointing" in m for m in raw):
        pytest.skip("this PEFT/transformers pair does not emit the deprecation warning")
    quiet = wrap(peft_calls())
    assert not any("is_gradient_checkpointing" in m or "vocabulary" in m for m in quiet)
    assert "another FutureWarning" in quiet


@pytest.mark.tolerance
def test_compile_trains_adapters_as_eager_and_saves_them(work, tmp_path, base_weights):
    """--compile with LoRA on every pathway: eager's losses and adapter, saved under its own names, merged; a
    model twice as deep compiles no more graphs. The adapter used to be written with no tensors: PEFT picks the
    adapter's keys by the model's module names, which accelerate's compiled regions prefix with `_orig_mod.`.
    Dropout is off: inductor draws other random masks than eager."""
    stages = "dense,experts,router,attention"
    eager = run(work, "eager_lora", stages, dropout=0.0)
    runs = {}
    graphs = compiled_graphs(
        lambda: runs.setdefault("c", run(work, "compiled_lora", stages, dropout=0.0, compile=True))
    )
    a, b = (
        [r["loss"] for r in read_metrics(x.train.run_dir / "metrics.jsonl") if "loss" in r]
        for x in (eager, runs["c"])
    )
    assert len(a) == len(b) == 3
    close(torch.tensor(b), torch.tensor(a), abs=0, rel=1e-5, what="compiled vs eager LoRA losses")
    wa, wb = (load_file(x.adapter_dir / "adapter_model.safetensors") for x in (eager, runs["c"]))
    assert wa and wa.keys() == wb.keys()  # every factor, under PEFT's own names
    # as in test_train's compiled run: Adam moves weights with tiny gradients by ±lr, so compare to the move
    moved = {k: float(wa[k].abs().max()) for k in wa if "lora_B" in k}  # B starts at 0: its value is its move
    worst = max(float((wb[k] - wa[k]).abs().max()) / moved[k] for k in moved)
    within(worst, 0.1, "compiled vs eager LoRA B, max |diff| / max |B| per tensor")
    merged = weights(runs["c"].merged_dir)
    assert any(not torch.equal(merged[k], base_weights[k]) for k in base_weights)  # the adapter is in it
    deep = tiny_moe_tree_deeper(tmp_path / "deep")
    spec = FinetuneSpec.build(
        stages=stages, rank=4, alpha=8, dropout=0.0, compile=True, data=str(work / "text.txt"), seq_len=32,
        batch=2, steps=3, lr=1e-2, log_every=1, eval_blocks=2,
    )  # fmt: skip
    deep_graphs = compiled_graphs(lambda: finetune(deep, tmp_path / "d", spec, progress=False))
    assert graphs > 0 and deep_graphs == graphs, (graphs, deep_graphs)


def test_finetune_and_compare_offer_compile():
    import typer

    commands = typer.main.get_command(app).commands
    assert all(
        "--compile" in {o for p in commands[name].params for o in p.opts}
        for name in ("train", "finetune", "compare")
    )
