"""Loading any model moegraft accepts (directory, hub id, .gguf, a `moegraft finetune` adapter) with
transformers' native classes (and PEFT for adapters), and mapping its parameters to pathways (router / experts /
dense / attention / norms / embeddings).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import patch

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedModel

from moegraft.errors import MoegraftError, SourceError, SpecError
from moegraft.experts_impl import NAME as MOEGRAFT_EXPERTS_IMPL
from moegraft.formats import PATHWAYS, TOWER_PATTERNS, TOWERS, format_of_moe
from moegraft.io.source import hub_name

# moegraft's own experts forward (moegraft.experts_impl): the picks path on decode, one sort and grouped matmuls
# on prefill and training; faster than transformers' `grouped_mm` and `eager` on CPU (benchmarks/bench_experts.py)
DEFAULT_EXPERTS_IMPL = MOEGRAFT_EXPERTS_IMPL
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: what marks a `moegraft finetune` adapter directory
# transformers 5.25 turns hub kernels on by default (`use_kernels` None -> True unless USE_HUB_KERNELS=0; 5.24 and
# before: off): at load and at every later `model.train()`/`.eval()` it fetches and runs code from
# `kernels-community/*` on the hub for CUDA/ROCm/XPU models (offline, that fails the load). moegraft runs no hub
# code unless this is set to 1.
HUB_KERNELS_ENV = "MOEGRAFT_HUB_KERNELS"


def hub_kernels() -> bool:
    """Whether moegraft's loads let transformers use its hub kernels (`MOEGRAFT_HUB_KERNELS=1`; off by default).

    Raises:
        SpecError: the variable holds something other than 1/0/true/false/yes/no/on/off.
    """
    value = os.environ.get(HUB_KERNELS_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SpecError(
        f"{HUB_KERNELS_ENV}={value!r}: set it to 1 (use transformers' hub kernels) or 0 (the default)"
    )


def load_causal_lm(
    src: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    merge: bool = True,
):
    """(model, tokenizer) for a directory, a hub id, or a .gguf file, in eval mode.

    Args:
        src: what `convert` accepts as SRC, a converted MoE directory, or a `moegraft finetune` adapter.
        dtype: weights dtype (fp32 on CPU: bf16 matmuls are far slower there).
        device: "cpu", "cuda", "cuda:1", "mps", ...
        merge: an adapter is merged into its base model (False: the PeftModel itself, its factors apart).
    """
    p = Path(src).expanduser()
    if (p / ADAPTER_CONFIG).is_file():
        return _load_adapter(p, dtype, device, with_tokenizer, merge)
    where, kwargs, on_hub = _location(src)
    # use_kernels=False leaves the model's `use_kernels` False, and transformers' `train()` re-kernelises only a
    # model whose `use_kernels` is True: nothing fetches hub code later either (tests/test_hub_kernels.py)
    kwargs |= {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_kernels": hub_kernels()}
    try:
        if (
            "gguf_file" in kwargs
        ):  # transformers' GGUF loader rebuilds gguf's name table per submodule otherwise
            from moegraft.io.gguf_source import memoised_name_map

            with memoised_name_map():
                model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(src, on_hub, e) from None
    tok = load_tokenizer(src, trust_remote_code=trust_remote_code) if with_tokenizer else None
    text = model.config.get_text_config()  # multimodal checkpoints keep the MoE in text_config
    if getattr(text, "num_experts", None) or getattr(text, "n_routed_experts", None):
        # pinned, so that a transformers default change cannot surprise us
        model.set_experts_implementation(DEFAULT_EXPERTS_IMPL)
    if device != "cpu":  # (it loaded on the CPU; under FSDP's CPU-RAM-efficient loading, ranks > 0 hold no
        model.to(device)  # weights yet, on the meta device, until rank 0's are broadcast to their shards)
    return model.eval(), tok


def load_tokenizer(src: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of a directory, a hub id or a .gguf file (what `load_causal_lm` gives beside the model).

    Raises:
        SourceError: none can be loaded from `src`.
    """
    where, kwargs, on_hub = _location(src)
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:  # a missing tokenizer is a ValueError in transformers 5
        raise _load_error(src, on_hub, e, what="a tokenizer") from None


def _location(src: str | Path) -> tuple[str | Path, dict, bool]:
    """(where from_pretrained looks, its gguf_file argument if any, whether that is a hub id)."""
    p = Path(src).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SourceError(f"{src}: no such GGUF file")
        return p.parent, {"gguf_file": p.name}, False
    if not p.exists():
        return hub_name(str(src), "directory"), {}, True  # a mistyped local path is never sent to the hub
    return src, {}, False


def _load_error(src: str | Path, on_hub: bool, e: BaseException, what: str = "model") -> SourceError:
    tried = "no such local directory; as a hub id: " if on_hub else ""
    return SourceError(f"{src}: {tried}cannot load {what} ({(str(e).splitlines() or [''])[0]})")


def load_adapter(adapter_dir: str | Path, **kwargs):
    """(model, tokenizer) of a `moegraft finetune` adapter: its base model with the adapter, merged unless
    `merge=False`; `kwargs` are load_causal_lm's."""
    if not (Path(adapter_dir) / ADAPTER_CONFIG).is_file():
        raise SourceError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a `moegraft finetune` adapter")
    return load_causal_lm(adapter_dir, **kwargs)


@contextlib.contextmanager
def peft_calls() -> Iterator[None]:
    """Context for the PEFT calls moegraft makes (get_peft_model, PeftModel.from_pretrained, save_pretrained).

    - PEFT takes moegraft's targets as they are named. PEFT rewrites transformers-v4 MoE targets for model
      types with a weight conversion (GLM-4.5 MoE among them): any `*.gate_proj` becomes the fused
      `gate_up_proj`, so the dense stage's shared_experts.gate_proj would turn into the routed experts'
      parameters. moegraft names transformers-v5 modules and parameters exactly.
    - Two PEFT warnings that name nothing the user can change stay quiet: its own read of transformers'
      deprecated `is_gradient_checkpointing`, and, saving an adapter on a GGUF base, that it finds no config
      there to check the vocabulary against (moegraft never changes the vocabulary).
    """
    # PEFT releases before the rewrite (peft>=0.15 is allowed) have nothing to switch off
    try:
        conversion = importlib.import_module("peft.utils.transformers_weight_conversion")
    except ImportError:
        conversion = None
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message="Could not find a config file in .*vocabulary", category=UserWarning
        )
        if hasattr(conversion, "_convert_peft_config_moe"):
            stack.enter_context(patch.object(conversion, "_convert_peft_config_moe", lambda *a, **k: None))
        yield


def _load_adapter(adapter_dir: Path, dtype: torch.dtype, device: str, with_tokenizer: bool, merge: bool):
    # The base is the adapter config's `base_model_name_or_path` (finetune records the absolute path).
    from peft import PeftModel

    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise SourceError(f"{adapter_dir}: the adapter config names no base model")
    model, tok = load_causal_lm(base, dtype=dtype, device="cpu", with_tokenizer=with_tokenizer)
    with peft_calls():
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
    if with_tokenizer and (adapter_dir / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(adapter_dir)  # the run's copy, in case the base moved on
    return model.to(device).eval(), tok


def pathway_of(name: str, patterns: dict[str, tuple[str, ...]]) -> str | None:
    """ "towers" for a multimodal tower's parameter, else the first pathway (in PATHWAYS order) one of whose
    patterns matches `name`."""
    if any(re.search(rx, name) for rx in TOWER_PATTERNS):
        return TOWERS
    for pathway in PATHWAYS:
        if any(re.search(rx, name) for rx in patterns.get(pathway, ())):
            return pathway
    return None


def parameters_by_pathway(model: PreTrainedModel) -> dict[str, list[str]]:
    """Pathway → parameter names of a converted MoE model; every parameter lands in exactly one ("towers": a
    multimodal checkpoint's vision/audio towers, frozen)."""
    patterns = format_of_moe(model.config.to_dict()).pathways()
    out: dict[str, list[str]] = {p: [] for p in (*PATHWAYS, TOWERS)}
    for name, _ in model.named_parameters():
        pathway = pathway_of(name, patterns)
        if pathway is None:
            raise MoegraftError(f"parameter {name} belongs to no pathway of {type(model).__name__}")
        out[pathway].append(name)
    return out


# transformers 5.x renamed the forward's `past_key_values` argument and output field to `cache` (the old names still
# work there, with a deprecation warning); moegraft allows transformers>=5.0, so it uses this release's name
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
)


def cached_forward(model: nn.Module, ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
    """(logits, cache) of one forward through the KV cache: `cache` None starts one (a prefill), else `ids`
    (B, t) continue it (decode steps)."""
    out = model(ids, use_cache=True, **({} if cache is None else {CACHE_ARG: cache}))
    return out.logits, out[CACHE_ARG]
