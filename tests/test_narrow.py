"""Every table moegraft prints reads whole at 80 columns (a log, a pipe, CI): no number cut to '…'."""

from __future__ import annotations

import json
from pathlib import Path

from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.eval.bench import bench
from moegraft.plan import plan
from moegraft.plan.report import _fmt_flops, _fmt_params
from moegraft.plan.training import _gib, plan_train
from narrow import assert_readable, render80

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
GEMMA4_31B = json.loads((CONFIGS / "gemma-4-31B.config.json").read_text())
# a 70B Llama (its published shape): carve needs the Llama family
LLAMA_70B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}
# the articles' kind of graft and a carve: the widest numbers plan prints (billions, TFLOP, GiB)
GRAFT = GraftSpec(num_experts=128, top_k=8, expert_size=1408)
CARVE = GraftSpec(num_experts=8, top_k=2, shared_size=14336, init="carve")


def test_plan_table_reads_at_80_columns():
    for config, spec in ((GEMMA4_31B, None), (GEMMA4_31B, GRAFT), (LLAMA_70B, CARVE)):
        report = plan(config, spec, context=262144, batch=16, gpu_memory_gb=80)
        models = [report.dense] + ([report.moe] if report.moe else [])
        values = [_fmt_params(c.total_params) for c in models] + [
            _fmt_flops(c.flops_per_token) for c in models
        ]
        assert_readable(render80(report.render), values)


def test_plan_train_table_reads_at_80_columns():
    for precision in ("bf16", "fp32"):
        tp = plan_train(GEMMA4_31B, GRAFT, trainable=("router", "experts", "dense"), precision=precision)
        assert_readable(render80(tp.render), [_gib(tp.optimizer_bytes), _gib(tp.grad_bytes)])


def test_bench_tables_read_at_80_columns(tiny_llama, tmp_path):
    moe = tmp_path / "moe"
    convert(str(tiny_llama), moe, GraftSpec(num_experts=4, top_k=2, expert_size=32), progress=False)
    r = bench(
        moe,
        baseline=tiny_llama,
        batch_sizes=(1, 16),
        prompt_len=4,
        new_tokens=1,
        warmup=0,
        reps=1,
        experts_impls=("batched_mm", "grouped_mm"),
    )
    values = [f"{row.decode_tok_s:.1f}" for row in r.rows] + [
        f"{x['prefill_time_ratio']:.3f}" for x in r.ratios()
    ]
    assert_readable(render80(r.render), values)
