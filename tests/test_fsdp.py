"""FSDP2 through `accelerate launch` on 2 CPU processes: the trained weights of one process with the same global
batch, `--resume` continuing exactly, full native safetensors at the end; and every shipped accelerate config is
one that accelerate accepts."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import build, byte_tokenizer, tiny_llama_config
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import read_texts
from moegraft.train.metrics import read_metrics
from tolerance import within

EXAMPLES = Path(__file__).parent.parent / "examples" / "accelerate"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_accepted_by_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = load_config_from_file(str(path))  # raises on keys accelerate does not know
    assert config.distributed_type == "FSDP"
    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(path), "x.py"])
    )
    assert args.use_fsdp and str(args.fsdp_version) == "2"
    # every fsdp_config key maps onto one of the launcher's --fsdp_* options
    assert all(hasattr(args, k) for k in yaml.safe_load(path.read_text())["fsdp_config"])
    if path.name == "fsdp.yaml":
        assert args.num_processes == 8 and args.mixed_precision == "bf16" and not config.use_cpu
    if path.name == "fsdp_cpu.yaml":
        assert args.num_processes == 2 and config.use_cpu


@pytest.fixture(scope="module")
def graft(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    # SmolLM2-shaped: tied embeddings, which FSDP's gathered state dict returns under both names
    dense = build(tiny_llama_config(tie_word_embeddings=True), root / "dense")
    byte_tokenizer().save_pretrained(dense)
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, calib_tokens=512)
    convert(str(dense), root / "moe", spec, progress=False)
    (root / "text.txt").write_text("\n\n".join(read_texts("stdlib:train")[:10]))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(root: Path, out: Path, batch: int) -> list[str]:
    # --gradient-checkpointing too: FSDP2 re-gathers each layer's shards when backward recomputes it; and a
    # --distill teacher, which every process loads whole although rank 0 alone reads the graft. No --device: as
    # users run it, `auto` on a machine without GPUs (with it, each launched process once trained alone and all
    # wrote OUT: the final save failed on rank 1)
    return [
        "-m", "moegraft.cli", "train", str(root / "moe"), str(out), "--data", str(root / "text.txt"),
        "--steps", "3", "--seq-len", "32", "--batch", str(batch), "--log-every", "1", "--save-every", "2",
        "--gradient-checkpointing", "--distill", str(root / "dense"), "--quiet",
    ]  # fmt: skip


def _one_process(args: list[str]) -> None:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _launch(root: Path, out: Path, *extra: str, args=_train_args) -> str:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "fsdp_cpu.yaml"),
        "--main_process_port", str(_free_port()), *args(root, out, batch=2), *extra,
    ]  # fmt: skip
    r = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.tolerance
def test_fsdp_two_processes_match_one_and_resume_exactly(graft):
    _one_process(_train_args(graft, graft / "one", batch=4))  # one plain process, global batch 4
    # two FSDP2 processes, 2 blocks each: the same global batch
    stdout = _launch(graft, graft / "two")
    assert stdout.count("trained 3 steps") == 1  # the main process's line only
    resolved = json.loads((graft / "two" / "moegraft-train.json").read_text())["resolved"]
    assert resolved["fsdp"] is True and resolved["processes"] == 2 and resolved["global_batch"] == 4
    one, two = (load_file(graft / d / "model" / "model.safetensors") for d in ("one", "two"))
    assert set(one) == set(two)
    # the same sums in another order (each process's share of the global batch): seen up to 7.8e-7 at this size
    within(max((one[k] - two[k]).abs().max() for k in one), 1e-4, "2 FSDP processes vs 1, max |dweight|")
    before = load_file(graft / "moe" / "model.safetensors")
    assert any(not torch.equal(before[k], two[k]) for k in before if ".mlp.experts." in k)
    # a full native checkpoint (gathered on rank 0), which transformers loads as it is
    AutoModelForCausalLM.from_pretrained(graft / "two" / "model")
    assert (graft / "two" / "checkpoints" / "step-2" / "pytorch_model_fsdp_0").is_dir()  # FSDP sharded state

    # a run stopped after the step-2 checkpoint, resumed under FSDP: the same final weights and last step
    cut = graft / "cut"
    shutil.copytree(graft / "two", cut)
    shutil.rmtree(cut / "model")
    (cut / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_metrics(cut / "metrics.jsonl") if r["step"] <= 2)
    )
    _launch(graft, cut, "--resume", "--device", "cpu")  # --device may change on resume
    resumed = load_file(cut / "model" / "model.safetensors")
    assert all(torch.equal(two[k], resumed[k]) for k in two)
    last = [r for r in read_metrics(cut / "metrics.jsonl") if r["step"] == 3 and "loss" in r]
    want = [r for r in read_metrics(graft / "two" / "metrics.jsonl") if r["step"] == 3 and "loss" in r]
    assert last[0]["loss"] == want[0]["loss"]
    assert want[0]["kl"] > 0  # the teacher ran on both processes


def _finetune_args(root: Path, out: Path, batch: int) -> list[str]:
    # --compile: FSDP2's gathered state dict and accelerate's compiled regions, both of which rename modules, meet
    # PEFT's save, which picks the adapter's keys by module name; no dropout, so that compiled runs can agree
    return [
        "-m", "moegraft.cli", "finetune", str(root / "moe"), str(out), "--data", str(root / "text.txt"),
        "--stage", "dense,experts", "--steps", "3", "--seq-len", "32", "--batch", str(batch), "--lr", "1e-2",
        "--dropout", "0", "--compile", "--merge", "--quiet",
    ]  # fmt: skip


@pytest.mark.tolerance
def test_fsdp_finetune_compiled_matches_one_process(graft):
    """LoRA under two FSDP2 processes and --compile: one final line, and the adapter of one process."""
    _one_process(_finetune_args(graft, graft / "ft_one", batch=4))
    stdout = _launch(graft, graft / "ft_two", args=_finetune_args)
    assert stdout.count("fine-tuned dense,experts") == 1 and "merged model in" in stdout  # rank 0's line
    one, two = (load_file(graft / d / "model" / "adapter_model.safetensors") for d in ("ft_one", "ft_two"))
    assert one and one.keys() == two.keys()
    # Adam moves weights with tiny gradients by ±lr whatever their size, so compare to the move: LoRA B starts at 0
    worst = max(float((two[k] - one[k]).abs().max() / one[k].abs().max()) for k in one if "lora_B" in k)
    within(worst, 0.1, "2 FSDP processes vs 1, compiled LoRA B, max |diff| / max |B|")
    AutoModelForCausalLM.from_pretrained(graft / "ft_two" / "merged")
