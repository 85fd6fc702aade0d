"""The whole pipeline on one GPU in one command, each stage timed and failing on its own; or, with --tiny, the same
stages at a tiny scale on the CPU (what CI runs: tests/test_gpu_check.py).

Run on a GPU machine (torch + transformers installed, moegraft importable; nothing is downloaded):

    PYTHONPATH=src python benchmarks/gpu_check.py --out /tmp/gpu_check --json benchmarks/results/gpu_check.json

(on a machine without moegraft's requirements and no network, as the lent GPUs are: `scripts/gpu_wheels.sh` here,
then `bash scripts/gpu_check_device.sh` there, carrying `.whl`), and on a CPU, in well under two minutes:

    PYTHONPATH=src python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check_tiny

Models: random weights in transformers' own classes, built here: a ~0.62B Llama (hidden 2048, 8 layers,
intermediate 8192, vocab 32000, 16 heads, 8 KV heads) and a small Gemma 4 (hidden 1024, 4 layers, intermediate
4096, vocab 32000), saved in bf16; --tiny: the test fixtures' shapes (hidden 64, head_dim 16, vocab 256) in fp32.
The tokenizer is a 256-token byte-level one built here; text is moegraft's embedded stdlib prose. HF_HUB_OFFLINE=1
is set; USE_HUB_KERNELS is left as the caller has it, so the check runs moegraft's own default. `train` and
`finetune` run where accelerate puts them (the first visible GPU): pick another GPU with CUDA_VISIBLE_DEVICES.

Stages, in order (a stage that needs an earlier one's output fails on its own when that one failed):
    build_models     the dense Llama and Gemma 4, and the tokenizer
    convert_graft    Llama -> Qwen2-MoE graft, 8 experts x 1024 (tiny: 4 x 32), top-2, calibrated (k-means router,
                     neuron init) on the device
    convert_carve    Llama -> carve at 50% of FFN neurons: 2048 shared + 2 of 6 experts x 1024 (tiny: 32 + 2 of
                     6 x 16), calibrated and refitted on the device
    convert_gemma4   Gemma 4 -> Gemma 4 MoE graft, 8 x 512 (tiny: 4 x 32), top-2, calibrated on the device
    exactness        graft vs dense logits, bf16 and fp32, every experts implementation (moegraft.check)
    train            `train` on the graft, bf16 on CUDA: 30 steps x 8 x 1024 tokens (tiny: 4 x 2 x 32)
    train_dense      the reference for a graft step: full fine-tuning of the dense Llama (every weight, AdamW, bf16
                     autocast over fp32 weights as `train` does), a plain loop over the same batches, 10 steps
    finetune_merge   `finetune --stage dense --merge` on the Gemma 4 graft
    eval             `eval` of the trained graft against the dense model
    bench            `bench` dense / graft / carve for every experts implementation at batch 1, 4, 16
    convert_carve_cpu  the carve again with --device cpu: calibration time on the CPU vs on the device
    train_compiled   `train --compile` (one decoder layer compiled, reused by all) as `train`, same steps. Alone:
                     --stages build_models,convert_graft,train,train_compiled
    bench_compiled   `bench --compile` (torch.compile, static KV cache, CUDA graphs) dense / carve / graft, grouped_mm
                     (what "moegraft" runs under compile) at batch 1, then 4, then 16 (tiny: batch 1), the carve
                     first at each: last, as it is the one stage that an open-ended number of graph compilations
                     can stretch, and it keeps what it finished when the budget stops it. Alone: --stages
                     build_models,convert_carve,convert_graft,bench_compiled

A global time budget (--budget-s, default 450 s, tiny 240 s) bounds the run: a stage that would start with no
time left is recorded as skipped ("skipped: time budget"), and one still running when the budget ends is
stopped (status "error", error "stopped: time budget"; `bench` and `bench_compiled` keep in "result" the models
and batch sizes they finished).

JSON written to --json (default OUT/gpu_check.json), schema version 1:
    {
      "schema": 1,
      "tiny": bool,
      "device": "cuda:0" | "cpu", "device_name": str, "peak_tflops": float | null,
      "versions": {"torch": str, "transformers": str, "moegraft": str, "python": str},
      "budget_s": float, "wall_s": float,
      "stages": [                                   # every stage above, in that order
        {"name": str,
         "status": "ok" | "error" | "skipped",
         "seconds": float,                          # wall time of the stage (0 when skipped)
         "error": str | null,                       # "ExceptionType: message", or "skipped: time budget"
         "result": {...} | null}                    # per stage, below
      ],
      "summary": {...}                              # the headline numbers, copied from the stages' results
    }
    results:
      build_models:    {"llama": {"params": int, "dir": str}, "gemma4": {...}}
      convert_*:       {"seconds": float, "bytes": int, "format": str, "moe_layers": [int], "device": str}
      exactness:       {"float32" | "bfloat16": {impl: {"max_abs_logit_diff", "max_abs_logit", "relative",
                        "greedy_identical"}}}
      train:           {"steps", "tokens", "tokens_per_s" (whole run), "tokens_per_s_last_window", "mfu" (whole
                        run, null without a known peak), "mfu_last_window", "flops_per_token", "eval_ppl",
                        "rows": [metrics.jsonl rows: step, tokens_per_s, window_seconds, mfu]}
      train_dense:     {"steps", "tokens_per_s" (the steps after the first), "mfu" (null without a peak),
                        "flops_per_token", "graft_over_dense_step_time" (dense tokens/s over train's last window)}
      train_compiled:  train's, plus "over_eager" (its last window's tokens/s over train's)
      finetune_merge:  {"steps", "tokens_per_s", "merged_dir", "eval_ppl"}
      eval:            {"perplexity", "baseline_perplexity", "kl", "top1_agreement", "dtype", "seconds"}
      bench:           {"graft" | "carve": {"flop_ratio", "active_param_ratio", "fastest_experts_impl",
                        "time_ratios": [{"experts_impl", "batch", "prefill_time_ratio", "decode_time_ratio"}]}}
      bench_compiled:  bench's, plus "compiled": true, per model
      convert_carve_cpu: convert_*'s, plus "device_seconds" (convert_carve's) and "cpu_over_device"
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub; a download attempt fails loudly
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

STAGES = (
    "build_models",
    "convert_graft",
    "convert_carve",
    "convert_gemma4",
    "exactness",
    "train",
    "train_dense",
    "finetune_merge",
    "eval",
    "bench",
    "convert_carve_cpu",
    "train_compiled",
    "bench_compiled",
)
SKIPPED = "skipped: time budget"
STOPPED = "stopped: time budget"


@dataclass(frozen=True)
class Scale:
    """Every size the stages use, full (one GPU) or tiny (CI, CPU)."""

    llama: dict
    gemma4: dict
    graft: dict  # GraftSpec fields of the Llama graft
    carve: dict
    gemma4_graft: dict
    dtype: torch.dtype  # the dense checkpoints' storage dtype
    calib_tokens: int
    train: dict  # TrainSpec fields
    finetune: dict
    eval_tokens: int
    eval_seq_len: int
    bench: dict  # bench() arguments
    bench_compiled: dict  # bench(compile=True) arguments
    exact_blocks: tuple[int, int]  # (N, T) random token blocks for exactness


FULL = Scale(
    llama=dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    gemma4=dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=128, global_head_dim=128, max_position_embeddings=2048,
        sliding_window=512, hidden_size_per_layer_input=0, vocab_size_per_layer_input=32000,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    ),
    graft=dict(num_experts=8, top_k=2, expert_size=1024, format="qwen2_moe"),
    carve=dict(init="carve", num_experts=6, top_k=2, shared_size=2048, format="qwen2_moe"),
    gemma4_graft=dict(num_experts=8, top_k=2, expert_size=512),
    dtype=torch.bfloat16,
    calib_tokens=8192,
    train=dict(steps=30, seq_len=1024, batch=8, log_every=10, eval_blocks=8),
    finetune=dict(steps=10, seq_len=256, batch=4, log_every=5, eval_blocks=4),
    eval_tokens=16384,
    eval_seq_len=512,
    bench=dict(batch_sizes=(1, 4, 16), prompt_len=128, new_tokens=32, warmup=1, reps=2),
    bench_compiled=dict(
        batch_sizes=(1, 4, 16), prompt_len=128, new_tokens=32, warmup=2, reps=2, experts_impls=("grouped_mm",)
    ),
    exact_blocks=(4, 256),
)  # fmt: skip

TINY = Scale(
    llama=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    ),
    gemma4=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=16, max_position_embeddings=128, sliding_window=16,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=256,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    ),
    graft=dict(num_experts=4, top_k=2, expert_size=32, format="qwen2_moe"),
    carve=dict(init="carve", num_experts=6, top_k=2, shared_size=32, format="qwen2_moe"),
    gemma4_graft=dict(num_experts=4, top_k=2, expert_size=32),
    dtype=torch.float32,  # bf16 matmuls are ~10x slower than fp32 on a CPU
    calib_tokens=1024,
    train=dict(steps=4, seq_len=32, batch=2, log_every=2, eval_blocks=2),
    finetune=dict(steps=2, seq_len=32, batch=2, log_every=1, eval_blocks=2),
    eval_tokens=256,
    eval_seq_len=32,
    bench=dict(batch_sizes=(1, 4, 16), prompt_len=16, new_tokens=4, warmup=0, reps=1),
    bench_compiled=dict(batch_sizes=(1,), prompt_len=16, new_tokens=4, warmup=2, reps=1, experts_impls=("grouped_mm",)),
    exact_blocks=(2, 32),
)  # fmt: skip

log = logging.getLogger("gpu_check")


class BudgetExceeded(BaseException):
    """The global time budget ran out inside a stage (a BaseException: library code catching Exception must not
    swallow it)."""


def _on_alarm(_signum, _frame):
    raise BudgetExceeded


def byte_tokenizer():
    """A 256-token byte-level tokenizer (EOS = byte 0), built offline: every token id is < 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=b2u[0])


def dense_full_ft_tokens_per_s(model: torch.nn.Module, batch: int, seq_len: int, steps: int) -> float:
    """Tokens/s of full fine-tuning `model` (every weight trains; fp32 weights, AdamW; bf16 autocast on CUDA, what
    `train --precision bf16` does with what trains) on random token ids, from the steps after the first (which
    allocates and warms up). The model stays in train mode with its weights changed."""
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    g = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    times = []
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g).to(device)  # (B, T)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    del opt
    return batch * seq_len * (steps - 1) / sum(times[1:])


class Check:
    """The run: its directory, device, scale and budget, and one method per stage (each returns its result)."""

    def __init__(self, out: Path, scale: Scale, device: torch.device, budget_s: float, tiny: bool):
        self.out, self.scale, self.device, self.budget_s, self.tiny = out, scale, device, budget_s, tiny
        self.results: dict[str, dict] = {}
        # what a stage has finished so far, recorded as its result should the budget stop it
        self.partial: dict[str, dict] = {}
        self.t0 = time.perf_counter()

    # -- helpers -------------------------------------------------------------------------------------------------

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def path(self, name: str) -> Path:
        return self.out / name

    def need(self, stage: str) -> dict:
        if stage not in self.results:
            raise RuntimeError(f"needs the output of stage {stage}, which did not finish")
        return self.results[stage]

    def run_stage(self, name: str, fn: Callable[[], dict]) -> dict:
        """Run one stage under the budget's alarm; its record whatever happens."""
        left = self.left()
        if left <= 1:
            log.info("%s: %s", name, SKIPPED)
            return {"name": name, "status": "skipped", "seconds": 0.0, "error": SKIPPED, "result": None}
        log.info("%s: start (%.0f s of the budget left)", name, left)
        t = time.perf_counter()
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, left)
        status, error, result = "ok", None, None
        try:
            result = fn()
            self.results[name] = result
        except BudgetExceeded:
            status, error, result = "error", STOPPED, self.partial.get(name)
        except Exception as e:  # recorded; the next stage runs
            status, error = "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.debug("%s", traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - t
        log.info("%s: %s in %.1f s%s", name, status, seconds, f" ({error})" if error else "")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"name": name, "status": status, "seconds": seconds, "error": error, "result": result}

    # -- stages --------------------------------------------------------------------------------------------------

    def build_models(self) -> dict:
        from transformers import AutoModelForCausalLM, Gemma4TextConfig, LlamaConfig

        tok = byte_tokenizer()
        out = {}
        for name, cfg in (
            ("llama", LlamaConfig(**self.scale.llama)),
            ("gemma4", Gemma4TextConfig(**self.scale.gemma4)),
        ):
            torch.manual_seed(0)
            with torch.device(self.device):  # random init on the device: seconds, not a minute, at 0.6B
                model = AutoModelForCausalLM.from_config(cfg, dtype=self.scale.dtype)
            d = self.path(f"dense_{name}")
            model.save_pretrained(d)
            tok.save_pretrained(d)
            out[name] = {"params": sum(p.numel() for p in model.parameters()), "dir": str(d)}
            del model
        return out

    def _convert(self, src: str, name: str, fields: dict, device: torch.device) -> dict:
        from moegraft.config import GraftSpec
        from moegraft.convert import convert

        spec = GraftSpec(**fields, calib_tokens=self.scale.calib_tokens)
        r = convert(src, self.path(name), spec, overwrite=True, progress=False, device=device)
        return {
            "seconds": r.seconds,
            "bytes": r.bytes_written,
            "format": r.format,
            "moe_layers": r.moe_layers,
            "device": str(device),
            "dir": str(r.out),
        }

    def convert_graft(self) -> dict:
        return self._convert(
            self.need("build_models")["llama"]["dir"], "graft", self.scale.graft, self.device
        )

    def convert_carve(self) -> dict:
        return self._convert(
            self.need("build_models")["llama"]["dir"], "carve", self.scale.carve, self.device
        )

    def convert_gemma4(self) -> dict:
        src = self.need("build_models")["gemma4"]["dir"]
        return self._convert(src, "gemma4_graft", self.scale.gemma4_graft, self.device)

    def convert_carve_cpu(self) -> dict:
        r = self._convert(
            self.need("build_models")["llama"]["dir"], "carve_cpu", self.scale.carve, torch.device("cpu")
        )
        on_device = self.results.get("convert_carve", {}).get("seconds")
        return {
            **r,
            "device_seconds": on_device,
            "cpu_over_device": r["seconds"] / on_device if on_device else None,
        }

    def exactness(self) -> dict:
        from moegraft.check import check_exactness
        from moegraft.eval.experts import experts_impls, set_experts_impl
        from moegraft.models import load_causal_lm

        dense_dir, graft_dir = self.need("build_models")["llama"]["dir"], self.need("convert_graft")["dir"]
        N, T = self.scale.exact_blocks
        blocks = torch.randint(0, 256, (N, T), generator=torch.Generator().manual_seed(0)).to(self.device)
        out: dict = {}
        for dtype in (torch.bfloat16, torch.float32):
            dense, tok = load_causal_lm(dense_dir, dtype=dtype, device=str(self.device))
            moe, _ = load_causal_lm(graft_dir, dtype=dtype, device=str(self.device), with_tokenizer=False)
            per = {}
            for impl in experts_impls(moe):
                set_experts_impl(moe, impl)
                r = check_exactness(dense, moe, tok, blocks, new_tokens=8)
                per[impl] = {
                    "max_abs_logit_diff": r.max_abs_logit_diff,
                    "max_abs_logit": r.max_abs_logit,
                    "relative": r.max_abs_logit_diff / max(r.max_abs_logit, 1e-30),
                    "greedy_identical": r.greedy_identical,
                }
            out[str(dtype).removeprefix("torch.")] = per
            del dense, moe
        return out

    def train(self, *, compile: bool = False) -> dict:
        from moegraft.train import TrainSpec, train
        from moegraft.train.metrics import read_metrics

        spec = TrainSpec(
            data="stdlib:train",
            device=str(self.device) if self.tiny else "auto",
            compile=compile,
            **self.scale.train,
        )
        run_dir = self.path("train_compiled" if compile else "train")
        r = train(self.need("convert_graft")["dir"], run_dir, spec, progress=False, overwrite=True)
        rows = [x for x in read_metrics(r.run_dir / "metrics.jsonl") if "window_tokens" in x]
        last = rows[-1] if rows else {}
        return {
            "steps": r.steps,
            "tokens": r.tokens,
            "tokens_per_s": r.tokens_per_s,
            "tokens_per_s_last_window": last.get("tokens_per_s"),
            "mfu": r.mfu,
            "mfu_last_window": last.get("mfu"),
            "flops_per_token": r.flops_per_token,
            "eval_ppl": r.eval_ppl,
            "model_dir": str(r.model_dir),
            "rows": [
                {k: x.get(k) for k in ("step", "tokens_per_s", "window_seconds", "mfu", "loss")} for x in rows
            ],
        }

    def train_compiled(self) -> dict:
        r = self.train(compile=True)
        eager = self.results.get("train", {}).get("tokens_per_s_last_window")
        return {**r, "over_eager": r["tokens_per_s_last_window"] / eager if eager else None}

    def train_dense(self) -> dict:
        """Full fine-tuning of the dense model, the step a graft step is held against (issue 26: no slower).

        A plain loop rather than `moegraft train`, which trains MoE checkpoints only: fp32 weights, AdamW, bf16
        autocast on CUDA (what `train --precision bf16` does with what trains), the graft run's batch shape.
        """
        from moegraft.device import peak_flops
        from moegraft.models import load_causal_lm
        from moegraft.plan.training import train_flops_per_token

        model, _ = load_causal_lm(
            self.need("build_models")["llama"]["dir"],
            dtype=torch.float32,
            device=str(self.device),
            with_tokenizer=False,
        )
        B, T = self.scale.train["batch"], self.scale.train["seq_len"]
        steps = 10
        tokens_per_s = dense_full_ft_tokens_per_s(model, B, T, steps)
        every = {n: tuple(p.shape) for n, p in model.named_parameters()}
        flops = train_flops_per_token(model.config.to_dict(), every, T).per_token  # as `train` counts its MFU
        peak = peak_flops(self.device)
        graft = self.results.get("train", {}).get("tokens_per_s_last_window")
        del model
        return {
            "steps": steps,
            "tokens_per_s": tokens_per_s,
            "flops_per_token": flops,
            "mfu": flops * tokens_per_s / peak if peak else None,
            "graft_over_dense_step_time": tokens_per_s / graft if graft else None,
        }

    def finetune_merge(self) -> dict:
        from moegraft.finetune import FinetuneSpec, finetune

        spec = FinetuneSpec.build(
            stages="dense", merge=True, data="stdlib:train", loss_mask="all", lr=1e-4,
            device=str(self.device) if self.tiny else "auto", **self.scale.finetune,
        )  # fmt: skip
        r = finetune(
            self.need("convert_gemma4")["dir"], self.path("finetune"), spec, progress=False, overwrite=True
        )
        return {
            "steps": r.train.steps,
            "tokens_per_s": r.train.tokens_per_s,
            "eval_ppl": r.train.eval_ppl,
            "merged_dir": None if r.merged_dir is None else str(r.merged_dir),
        }

    def eval(self) -> dict:
        from moegraft.eval.evaluate import evaluate

        model = self.results.get("train", {}).get("model_dir") or self.need("convert_graft")["dir"]
        r = evaluate(
            model,
            baseline=self.need("build_models")["llama"]["dir"],
            data="stdlib:heldout",
            max_tokens=self.scale.eval_tokens,
            seq_len=self.scale.eval_seq_len,
            batch_size=4,
            device=str(self.device),
        )
        m = r.metrics
        return {
            "model": str(model),
            "perplexity": m.perplexity,
            "baseline_perplexity": m.baseline_perplexity,
            "kl": m.kl,
            "top1_agreement": m.top1_agreement,
            "dtype": r.dtype,
            "seconds": r.seconds,
        }

    def bench(self, *, compile: bool = False) -> dict:
        from moegraft.device import default_dtype
        from moegraft.eval.bench import bench

        dense = self.need("build_models")["llama"]["dir"]
        dtype = str(default_dtype(self.device)).removeprefix("torch.")
        kwargs = dict(self.scale.bench_compiled if compile else self.scale.bench)
        # compiled: batch by batch, the carve first at each (its ratio is the one issue 26 bounds), since every
        # (model, batch, prefill or decode) is its own compilation and the budget may stop the stage part way;
        # eager: every batch size in one call per model
        batches = [(b,) for b in kwargs.pop("batch_sizes")] if compile else [kwargs.pop("batch_sizes")]
        names = ("carve", "graft") if compile else ("graft", "carve")
        out = self.partial["bench_compiled" if compile else "bench"] = {}
        missing = {name: f"needs convert_{name}" for name in names if f"convert_{name}" not in self.results}
        for batch_sizes in batches:
            for name in names:
                if name in missing:
                    continue
                r = bench(
                    self.results[f"convert_{name}"]["dir"],
                    baseline=dense,
                    dtype=dtype,
                    device=str(self.device),
                    compile=compile,
                    batch_sizes=batch_sizes,
                    **kwargs,
                )
                j = r.to_json()
                row = out.setdefault(name, {"dtype": dtype, "time_ratios": []})
                row.update(
                    {
                        k: j[k]
                        for k in ("flop_ratio", "active_param_ratio", "fastest_experts_impl", "compiled")
                    }
                )
                row["time_ratios"] += j["time_ratios"]
                log.info(
                    "bench%s %s at batch %s: %s",
                    " --compile" if compile else "",
                    name,
                    ",".join(map(str, batch_sizes)),
                    json.dumps(j["time_ratios"]),
                )
        if missing:
            raise RuntimeError("; ".join(f"{k}: {v}" for k, v in missing.items()))
        return out

    def bench_compiled(self) -> dict:
        return self.bench(compile=True)


def summary(stages: list[dict]) -> dict:
    """The headline numbers: MFU, tokens/s, time ratios per implementation and batch, convert times."""
    res = {s["name"]: s["result"] or {} for s in stages}
    out: dict = {"ok": sum(s["status"] == "ok" for s in stages), "of": len(stages)}
    t = res.get("train", {})
    out["train_tokens_per_s"] = t.get("tokens_per_s_last_window")
    out["train_mfu"] = t.get("mfu_last_window")
    tc = res.get("train_compiled", {})
    out["train_compiled_tokens_per_s"] = tc.get("tokens_per_s_last_window")
    out["train_compiled_mfu"] = tc.get("mfu_last_window")
    d = res.get("train_dense", {})
    out["dense_full_ft_tokens_per_s"] = d.get("tokens_per_s")
    out["graft_over_dense_step_time"] = d.get("graft_over_dense_step_time")  # issue 26: <= 1
    for stage, suffix in (("bench", ""), ("bench_compiled", "_compiled")):
        for name in ("graft", "carve"):
            b = res.get(stage, {}).get(name, {})
            if b.get("time_ratios"):
                out[f"{name}_flop_ratio"] = b["flop_ratio"]
                out[f"{name}_time_ratios{suffix}"] = {
                    f"{x['experts_impl']}@{x['batch']}": [
                        round(x["prefill_time_ratio"], 3),
                        round(x["decode_time_ratio"], 3),
                    ]
                    for x in b["time_ratios"]
                }  # [prefill, decode] model time / dense time
    c = res.get("convert_carve_cpu", {})
    out["carve_convert_s"] = {"device": c.get("device_seconds") or res.get("convert_carve", {}).get("seconds"),
                              "cpu": c.get("seconds")}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working directory (models, runs, log, JSON)")
    p.add_argument("--json", type=Path, default=None, help="the JSON (default OUT/gpu_check.json)")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (CI)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: auto; --tiny: cpu)")
    p.add_argument(
        "--budget-s", type=float, default=None, help="global wall-time budget (default 450; tiny 240)"
    )
    p.add_argument("--stages", default=None, help="comma-separated subset of the stages (default: all)")
    args = p.parse_args(argv)

    from moegraft import __version__
    from moegraft.device import peak_flops, resolve_device

    device = resolve_device(args.device or ("cpu" if args.tiny else "auto"))
    scale = TINY if args.tiny else FULL
    budget = args.budget_s or (240.0 if args.tiny else 450.0)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out / "gpu_check.json"
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[
            logging.StreamHandler(sys.stderr),
            logging.FileHandler(json_path.with_suffix(".log"), mode="w"),
        ],
    )
    wanted = STAGES if args.stages is None else tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = set(wanted) - set(STAGES)
    if unknown:
        p.error(f"unknown stages: {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_flops(device)
    log.info(
        "gpu_check on %s (%s), budget %.0f s, %s scale", device, name, budget, "tiny" if args.tiny else "full"
    )
    check = Check(args.out, scale, device, budget, args.tiny)
    stages = [check.run_stage(s, getattr(check, s)) for s in STAGES if s in wanted]
    doc = {
        "schema": 1,
        "tiny": args.tiny,
        "device": str(device),
        "device_name": name,
        "peak_tflops": None if peak is None else peak / 1e12,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "moegraft": __version__,
            "python": platform.python_version(),
        },
        "budget_s": budget,
        "wall_s": time.perf_counter() - check.t0,
        "stages": stages,
        "summary": summary(stages),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    log.info("summary: %s", json.dumps(doc["summary"], default=_jsonable))
    log.info(
        "wrote %s (%d of %d stages ok) in %.0f s", json_path, doc["summary"]["ok"], len(stages), doc["wall_s"]
    )
    return 0 if all(s["status"] == "ok" for s in stages) else 1


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
