"""moegraft.compare on a tiny Llama and its tiny Qwen2-MoE graft: equal budget, same blocks, honest rows, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import build, byte_tokenizer, tiny_llama_config
from moegraft.compare import ROWS, CompareResult, compare, lora_rank
from moegraft.errors import MoegraftError
from moegraft.eval.compare_report import WIDTH, load_sweep, sweep_verdict
from moegraft.train import TrainSpec
from moegraft.train.batches import BlockStream
from tolerance import close, within

STEPS, SEQ, BATCH, EVAL_BLOCKS = 2, 32, 4, 4


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from moegraft.config import GraftSpec
    from moegraft.convert import convert
    from moegraft.data import read_texts

    root = tmp_path_factory.mktemp("compare")
    dense = build(tiny_llama_config(), root / "dense")
    byte_tokenizer().save_pretrained(dense)
    convert(str(dense), root / "moe", GraftSpec(num_experts=4, top_k=2, expert_size=32), progress=False)
    (root / "text.txt").write_text("\n\n".join(read_texts("stdlib:train")[:30]))
    # small corpora for the CLI run (its held-out and retention sets follow the train defaults)
    (root / "small.txt").write_text("\n\n".join(read_texts("stdlib:train")[:4]))
    (root / "retain.txt").write_text(read_texts("stdlib:heldout")[0][:600])
    return root


def spec(work: Path) -> TrainSpec:
    return TrainSpec(
        data=str(work / "text.txt"),
        seq_len=SEQ,
        batch=BATCH,
        steps=STEPS,
        lr=3e-3,
        log_every=1,
        eval_blocks=EVAL_BLOCKS,
    )


@pytest.fixture(scope="module")
def run(work) -> tuple[CompareResult, list[torch.Tensor], list[str]]:
    """One comparison; every micro-batch either run drew, in order, and which run drew it."""
    batches: list[torch.Tensor] = []
    steps_of: list[str] = []
    original = BlockStream.micro_batch

    def spy(self, step, micro, rank):
        x = original(self, step, micro, rank)
        batches.append(x.clone())
        return x

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BlockStream, "micro_batch", spy)
        result = compare(
            work / "dense",
            work / "moe",
            work / "cmp",
            spec(work),
            retain_data="stdlib:heldout",
            report_dir=work / "cmp_report",
            progress=False,
            callback=lambda name, row: steps_of.append(name),
        )
    return result, batches, steps_of


def test_lora_trainable_count_is_the_closest_rank(run):
    result, _, _ = run
    dense, graft, lora = result.rows
    per_rank, r = result.lora_params_per_rank, result.lora_rank
    assert lora.trainable_params == r * per_rank
    # no other rank gets closer to the graft's trainable count (router + experts)
    gap = abs(lora.trainable_params - graft.trainable_params)
    assert gap <= per_rank / 2
    assert all(abs(k * per_rank - graft.trainable_params) >= gap for k in (r - 1, r + 1) if k >= 1)
    assert dense.trainable_params == 0 and graft.trainable_params > 0
    assert lora_rank(10, 100) == 1 and lora_rank(250, 100) in (2, 3) and lora_rank(1049, 100) == 10


def test_both_runs_saw_the_same_blocks_in_the_same_order(work, run):
    result, batches, steps_of = run
    assert steps_of == ["graft"] * STEPS + ["lora"] * STEPS
    assert len(batches) == 2 * STEPS
    for a, b in zip(batches[:STEPS], batches[STEPS:], strict=True):
        assert torch.equal(a, b)
    saved = [
        json.loads((work / "cmp" / name / "moegraft-train.json").read_text()) for name in ("graft", "lora")
    ]
    for key in ("train_blocks_sha256", "eval_blocks_sha256", "steps", "global_batch", "train_blocks"):
        assert saved[0]["resolved"][key] == saved[1]["resolved"][key]
    assert saved[0]["spec"]["seed"] == saved[1]["spec"]["seed"]
    assert saved[1]["spec"]["lr"] == result.lora_lr and saved[1]["spec"]["balance"] == "none"
    assert result.tokens == STEPS * BATCH * SEQ and result.steps == STEPS


@pytest.mark.tolerance
def test_dense_row_equals_moegraft_eval_on_the_same_blocks(work, run):
    from typer.testing import CliRunner

    from moegraft.cli import app
    from moegraft.data import pack, read_texts
    from moegraft.eval.evaluate import evaluate
    from moegraft.train.batches import split_heldout
    from moegraft.train.loop import blocks_digest

    result, _, _ = run
    dense = result.rows[0]
    # the held-out tail train() scored: the same blocks the graft run recorded
    tok = byte_tokenizer()
    blocks = pack(read_texts(str(work / "text.txt"), tokenizer=tok), tok, SEQ)
    _, heldout = split_heldout(blocks, 0.05, EVAL_BLOCKS)
    saved = json.loads((work / "cmp" / "graft" / "moegraft-train.json").read_text())["resolved"]
    assert blocks_digest(heldout) == saved["eval_blocks_sha256"] and len(heldout) == result.domain_blocks
    ev = evaluate(str(work / "dense"), data=heldout, max_tokens=heldout.numel(), seq_len=SEQ)
    # the same NLL summed in fp32 over other batches: a few ulps (1.2e-7), seen 2.5e-7 relative; bound 2e-6
    close(ev.metrics.perplexity, dense.domain_ppl, rel=2e-6, what="eval vs compare dense perplexity")
    # retention: `moegraft eval --retain-data` prints the dense model's perplexity on the same blocks
    report = work / "eval_report"
    r = CliRunner().invoke(
        app,
        [
            "eval",
            str(work / "dense"),
            "--baseline",
            str(work / "dense"),
            "--data",
            str(work / "text.txt"),
            "--retain-data",
            "stdlib:heldout",
            "--max-tokens",
            str(EVAL_BLOCKS * SEQ),
            "--seq-len",
            str(SEQ),
            "--report",
            str(report),
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    m = re.search(r"retention on stdlib:heldout: perplexity ([\d.]+) \((\d+) tokens\), baseline", r.output)
    assert m
    # printed with 4 decimals (rounding <= 5e-5), and the two runs sum fp32 log-probs in other batches: seen up
    # to 9.7e-5 in all; bound 1e-3
    close(float(m[1]), dense.retain_ppl, abs=1e-3, what="printed retention perplexity vs compare's")
    assert int(m[2]) == result.retain_blocks * (SEQ - 1)
    doc = json.loads((report / "report.json").read_text())
    assert doc["retain_data"] == "stdlib:heldout"
    within(abs(doc["retain"]["kl"]), 1e-9, "KL of a model to itself")
    assert "### Retention" in (report / "report.md").read_text()


def test_compare_files_hold_the_three_rows(work, run):
    result, _, _ = run
    out = work / "cmp"
    doc = json.loads((out / "compare.json").read_text())
    assert list(doc["rows"]) == list(ROWS)
    assert doc["rows"]["dense"]["domain_delta_pct"] == 0 and doc["rows"]["graft"]["domain_kl"] is not None
    assert doc["lora_rank"] == result.lora_rank and set(doc["winners"]) >= {"domain perplexity"}
    # the additive graft costs more per token; the merged LoRA costs what dense costs
    assert doc["rows"]["graft"]["flops_ratio"] > 1 and doc["rows"]["lora"]["flops_ratio"] == 1
    assert doc["rows"]["graft"]["active_params"] > doc["rows"]["dense"]["active_params"]
    md = (out / "compare.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| dense", "| graft", "| LoRA r="))]
    assert len(rows) == 3 and "Won — domain perplexity:" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ROWS:  # --report: each model's eval report, with the retention set beside the domain
        rep = json.loads((work / "cmp_report" / name / "report.json").read_text())
        assert rep["retain"]["perplexity"] == pytest.approx(doc["rows"][name]["retain_ppl"])
    assert not list(work.glob(".cmp.tmp-*"))  # written atomically


def test_train_on_a_dense_model_needs_adapt(work, tmp_path):
    from moegraft.train import train

    with pytest.raises(MoegraftError, match="not a moegraft MoE format"):
        train(work / "dense", tmp_path / "run", spec(work), progress=False)


def test_cli_end_to_end_and_existing_out(work):
    from typer.testing import CliRunner

    from moegraft.cli import app

    out = work / "cmp_cli"
    args = [
        "compare",
        str(work / "dense"),
        str(work / "moe"),
        str(out),
        "--data",
        str(work / "small.txt"),
        "--retain-data",
        str(work / "retain.txt"),
        "--steps",
        "2",
        "--seq-len",
        str(SEQ),
        "--batch",
        "2",
        "--lora-lr",
        "2e-3",
        "--quiet",
    ]
    runner = CliRunner(env={"COLUMNS": "200"})  # the table's width
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "graft" in r.output and "LoRA r=" in r.output and "Won —" in r.output
    # beside the table: what the shipped budget sweep measured, on which model
    assert sweep_verdict(load_sweep())[0] in r.output
    assert json.loads((out / "compare.json").read_text())["lora_lr"] == 2e-3
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert r.output.strip().startswith("error:") and "already exists" in r.output
    assert len(r.output.strip().splitlines()) == 1


def sweep(domain_graft_wins: tuple[bool, ...], retain_graft_wins: tuple[bool, ...]) -> dict:
    """A budget sweep (10k, 40k, 160k) where the graft beats the LoRA exactly where told, per axis."""

    def pair(graft_wins: bool) -> tuple[float, float]:
        return (-20.0, -10.0) if graft_wins else (-10.0, -20.0)  # (graft, LoRA) Δ%: lower wins

    budgets = []
    for tokens, d, r in zip((10_240, 40_960, 163_840), domain_graft_wins, retain_graft_wins, strict=True):
        (gd, ld), (gr, lr) = pair(d), pair(r)
        budgets.append(
            {
                "tokens": tokens,
                "graft": {"domain_delta_pct": gd, "retain_delta_pct": gr},
                "lora": {"domain_delta_pct": ld, "retain_delta_pct": lr},
            }
        )
    budgets.reverse()  # the verdict sorts them
    return {"model": "TinyLM-1M", "domain": "python docs", "retention": "legal prose", "budgets": budgets}


@pytest.mark.parametrize(
    ("domain", "retain", "says"),
    [
        (
            (False, True, True),
            (False, False, False),
            ["domain: graft ahead from 40k (LoRA at 10k)", "retention: LoRA ahead at 10k/40k/160k"],
        ),
        (
            (False, True, False),
            (True, True, True),
            ["domain: graft ahead at 40k, LoRA at 10k/160k", "retention: graft ahead at 10k/40k/160k"],
        ),
        (
            (False, False, True),
            (True, False, True),
            [
                "domain: graft ahead from 160k (LoRA at 10k/40k)",
                "retention: graft ahead at 10k/160k, LoRA at 40k",
            ],
        ),
    ],
)
def test_sweep_verdict_follows_the_json(domain, retain, says):
    """The printed verdict says where the graft overtook the LoRA, per axis, as the sweep's numbers say."""
    lines = sweep_verdict(sweep(domain, retain))
    text = " ".join(line.strip() for line in lines)
    assert 1 <= len(lines) <= 3 and all(len(line) <= WIDTH for line in lines)
    assert lines[0].startswith("budget sweep (TinyLM-1M, python docs, retention on legal prose)")
    for phrase in says:
        assert phrase in text


def test_shipped_sweep_is_printed_and_fits():
    """The package ships the sweep; its verdict names the model it was measured on and fits 80 columns."""
    shipped = load_sweep()
    assert shipped is not None and shipped["budgets"]
    lines = sweep_verdict(shipped)
    assert shipped["model"] in lines[0] and all(len(line) <= WIDTH for line in lines)
    assert sweep_verdict(None) == [] and sweep_verdict({"budgets": []}) == []
