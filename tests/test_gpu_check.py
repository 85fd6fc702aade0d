"""benchmarks/gpu_check.py --tiny: every stage of the one-command GPU check runs (on tiny models, on this CPU) and
the JSON holds what its docstring says; the time budget skips what it cannot fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
from gpu_check import SKIPPED, STAGES, STOPPED, TINY, BudgetExceeded, Check  # noqa: E402


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_tiny_runs_every_stage(tmp_path):
    r = run("--tiny", "--out", str(tmp_path))
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {s["name"]: s["error"] for s in doc["stages"] if s["status"] != "ok"}
    assert r.returncode == 0 and not failed, (failed, r.stderr[-3000:])
    assert [s["name"] for s in doc["stages"]] == list(STAGES)
    assert doc["schema"] == 1 and doc["tiny"] and doc["device"] == "cpu" and doc["wall_s"] <= doc["budget_s"]
    assert (tmp_path / "gpu_check.log").read_text().count(": ok in ") == len(STAGES)
    res = {s["name"]: s["result"] for s in doc["stages"]}
    # the graft's zero output path adds exact zeros: seen 0.0 for every implementation in both dtypes
    for per in res["exactness"].values():
        assert set(per) == {"moegraft", "eager", "grouped_mm", "batched_mm"}
        assert all(x["max_abs_logit_diff"] == 0.0 and x["greedy_identical"] for x in per.values())
    assert res["train"]["tokens_per_s"] > 0 and res["train"]["flops_per_token"] > 0
    assert res["train"]["mfu"] is None  # no peak known for a CPU
    assert res["train_compiled"]["over_eager"] > 0 and res["train_compiled"]["steps"] == res["train"]["steps"]
    dense = res["train_dense"]
    assert dense["tokens_per_s"] > 0 and dense["graft_over_dense_step_time"] > 0 and dense["mfu"] is None
    # full fine-tuning trains every weight: more FLOPs per token than the graft's router and experts
    assert dense["flops_per_token"] > res["train"]["flops_per_token"] / res["bench"]["graft"]["flop_ratio"]
    assert Path(res["finetune_merge"]["merged_dir"], "config.json").is_file()
    assert res["eval"]["kl"] is not None and res["eval"]["dtype"] == "float32"
    for name in ("graft", "carve"):
        ratios = res["bench"][name]["time_ratios"]
        assert {(x["experts_impl"], x["batch"]) for x in ratios} == {
            (i, b) for i in ("moegraft", "eager", "grouped_mm", "batched_mm") for b in (1, 4, 16)
        }
    assert res["bench"]["carve"]["flop_ratio"] < 1 < res["bench"]["graft"]["flop_ratio"]
    for name in ("graft", "carve"):
        compiled = res["bench_compiled"][name]
        assert compiled["compiled"] and {
            (x["experts_impl"], x["batch"]) for x in compiled["time_ratios"]
        } == {("grouped_mm", 1)}
        assert doc["summary"][f"{name}_time_ratios_compiled"]["grouped_mm@1"][1] > 0
    assert res["convert_carve_cpu"]["device"] == "cpu" and res["convert_carve_cpu"]["cpu_over_device"] > 0
    assert doc["summary"]["ok"] == len(STAGES)


def test_the_budget_skips_what_it_cannot_fit(tmp_path):
    r = run("--tiny", "--out", str(tmp_path), "--budget-s", "1.5", "--stages", "build_models,convert_graft")
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    build, convert = doc["stages"]
    assert r.returncode == 1
    # the build may finish inside 1.5 s or be stopped at it; either way no time is left for the convert
    assert build["status"] == "ok" or build["error"] == STOPPED
    assert convert == {
        "name": "convert_graft",
        "status": "skipped",
        "seconds": 0.0,
        "error": SKIPPED,
        "result": None,
    }


def test_a_stage_stopped_by_the_budget_keeps_what_it_finished(tmp_path):
    check = Check(tmp_path, TINY, torch.device("cpu"), budget_s=60.0, tiny=True)

    def half_done():
        check.partial["bench_compiled"] = {"carve": {"time_ratios": [{"batch": 1}]}}
        raise BudgetExceeded  # what the budget's alarm raises inside a stage

    record = check.run_stage("bench_compiled", half_done)
    assert record["status"] == "error" and record["error"] == STOPPED
    assert record["result"] == {"carve": {"time_ratios": [{"batch": 1}]}}
    assert "bench_compiled" not in check.results  # a later stage that needs it does not take it as finished
