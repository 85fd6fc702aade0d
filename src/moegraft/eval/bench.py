"""Speed and memory of a model against its dense baseline: prefill and decode throughput over batch sizes.

In: a model and an optional baseline (objects or sources), batch sizes, prompt length, new tokens.
Out: a BenchResult: one row per (model × experts implementation, batch size) with median times,
tokens/s and peak memory, plus the active-parameter and FLOP ratios next to the measured time ratios.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from moegraft.device import default_dtype, resolve_device
from moegraft.errors import MoegraftError
from moegraft.eval.compiled import CompiledDecoder
from moegraft.eval.experts import current_experts_impl, set_experts_impl
from moegraft.eval.experts import experts_impls as usable_experts_impls
from moegraft.eval.loading import as_dtype, resolve_model
from moegraft.models import cached_forward
from moegraft.progress import Progress

# ---------------------------------------------------------------------------------------------
# Peak memory: CUDA allocator stats, or on CPU the resident-set high-water mark (reset per run)


def _rss_kib(field_name: str) -> int | None:
    try:
        m = re.search(rf"{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """Context manager: `.peak` = bytes allocated above the level at entry, at the highest point inside.

    CPU: Linux's VmHWM, reset by writing 5 to /proc/self/clear_refs; None where that is not possible.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = None
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
            self._start = _rss_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None and (hwm := _rss_kib("VmHWM")) is not None:
            self.peak = max(0, hwm - self._start) * 1024


# ---------------------------------------------------------------------------------------------
# One timed run: prefill the prompt, then greedy decode with the KV cache (EOS ignored)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_once(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int, compiled: CompiledDecoder | None = None
) -> tuple[float, float, int | None]:
    """(prefill seconds, decode seconds, peak bytes) for one prompt (B, T) and `new_tokens` greedy steps.

    Prefill is one full forward with logits at every position (what eval and training run); decode feeds
    one token per sequence per step through the cache, for exactly `new_tokens` steps. With `compiled`, both
    run through its compiled forward and static cache instead of the eager forward and a dynamic cache.
    """
    device = prompt.device
    B, T = prompt.shape
    with PeakMemory(device) as mem:
        if compiled is not None:
            compiled.start(B)
        _sync(device)
        t0 = time.perf_counter()
        if compiled is None:
            logits, cache = cached_forward(model, prompt)
        else:
            logits = compiled.forward(prompt, 0)
        nxt = logits[:, -1:].argmax(-1)  # (B, 1)
        _sync(device)
        t1 = time.perf_counter()
        del logits
        for i in range(new_tokens):
            if compiled is None:
                logits, cache = cached_forward(model, nxt, cache)
            else:
                logits = compiled.forward(nxt, T + i)
            nxt = logits[:, -1:].argmax(-1)  # (B, 1)
        _sync(device)
        t2 = time.perf_counter()
        if compiled is None:
            del cache
    return t1 - t0, t2 - t1, mem.peak


# ---------------------------------------------------------------------------------------------
# Cost from the config: active parameters and FLOPs per token


@dataclass(frozen=True)
class ModelCostSummary:
    total_params: int
    active_params: int  # per token: K of E experts + dense/shared + attention + embeddings
    flops_per_token: int | None  # prefill over the prompt (mean context prompt_len / 2), from moegraft.plan


def cost_of(model: nn.Module, prompt_len: int) -> ModelCostSummary:
    """Active parameters and FLOPs per token from the config (moegraft.plan), or counted from the weights."""
    from moegraft.plan import plan

    try:
        c = plan(model.config.to_dict(), context=max(1, prompt_len // 2)).dense
        return ModelCostSummary(c.total_params, c.active_params, c.flops_per_token)
    except Exception:  # a model plan does not know: count parameters, K/E of every experts module
        total = sum(p.numel() for p in model.parameters())
        cfg = model.config.get_text_config()
        E = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None)
        K = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "top_k_experts", None)
        idle = 0
        if E and K:
            for name, p in model.named_parameters():
                if ".experts." in name:
                    idle += p.numel() * (E - K) // E
        return ModelCostSummary(total, total - idle, None)


# ---------------------------------------------------------------------------------------------
# The bench


@dataclass(frozen=True)
class BenchRow:
    """Medians over the repetitions of one (model, experts implementation, batch size)."""

    model: str  # "model" or "baseline"
    experts_impl: str | None
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_mem_bytes: int | None  # above the weights: activations, logits, KV cache

    @property
    def label(self) -> str:
        return self.model + (f" [{self.experts_impl}]" if self.experts_impl else "")


@dataclass
class BenchResult:
    """All rows, the costs of both models, and MoE/dense ratios per implementation and batch size."""

    model: str
    baseline: str | None
    dtype: str
    device: str
    reps: int
    rows: list[BenchRow]
    model_cost: ModelCostSummary
    baseline_cost: ModelCostSummary | None
    weight_bytes: dict[str, int]
    fastest_experts_impl: str | None  # by total prefill time over batch sizes
    notes: list[str] = field(default_factory=list)
    compiled: bool = False  # every run under torch.compile with a static KV cache (moegraft.eval.compiled)

    @property
    def active_param_ratio(self) -> float | None:
        return (
            None
            if self.baseline_cost is None
            else self.model_cost.active_params / self.baseline_cost.active_params
        )

    @property
    def flop_ratio(self) -> float | None:
        if (
            self.baseline_cost is None
            or not self.model_cost.flops_per_token
            or not self.baseline_cost.flops_per_token
        ):
            return None
        return self.model_cost.flops_per_token / self.baseline_cost.flops_per_token

    def ratios(self) -> list[dict]:
        """Per (implementation, batch): model time ÷ baseline time for prefill and decode."""
        base = {r.batch: r for r in self.rows if r.model == "baseline"}
        out = []
        for r in self.rows:
            if r.model == "model" and r.batch in base:
                b = base[r.batch]
                out.append(
                    {
                        "experts_impl": r.experts_impl,
                        "batch": r.batch,
                        "prefill_time_ratio": r.prefill_s / b.prefill_s,
                        "decode_time_ratio": r.decode_s / b.decode_s,
                    }
                )
        return out

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "baseline": self.baseline,
            "dtype": self.dtype,
            "device": self.device,
            "compiled": self.compiled,
            "reps": self.reps,
            "rows": [{**asdict(r), "label": r.label} for r in self.rows],
            "model_cost": asdict(self.model_cost),
            "baseline_cost": None if self.baseline_cost is None else asdict(self.baseline_cost),
            "active_param_ratio": self.active_param_ratio,
            "flop_ratio": self.flop_ratio,
            "time_ratios": self.ratios(),
            "weight_bytes": self.weight_bytes,
            "fastest_experts_impl": self.fastest_experts_impl,
            "notes": self.notes,
        }

    def render(self, console) -> None:
        """Rich tables: throughput rows, then ratios next to the active-parameter and FLOP ratios."""
        from rich.markup import escape
        from rich.table import Table

        how = ", compiled" if self.compiled else ""
        t = Table(title=f"bench {self.model} ({self.dtype}, {self.device}{how}, median of {self.reps})")
        # short headers and the experts implementation in its own column: the table reads whole at 80 columns
        for col in (
            "model",
            "experts",
            "batch",
            "prompt",
            "new",
            "prefill tok/s",
            "decode tok/s",
            "peak MiB",
        ):
            t.add_column(
                col, justify="left" if col in ("model", "experts") else "right", no_wrap=col != "model"
            )
        for r in self.rows:
            mem = "n/a" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.0f}"
            t.add_row(
                escape(r.model),
                r.experts_impl or "—",
                str(r.batch),
                str(r.prompt_len),
                str(r.new_tokens),
                f"{r.prefill_tok_s:.0f}",
                f"{r.decode_tok_s:.1f}",
                mem,
            )
        console.print(t)
        if self.baseline_cost is None:
            return
        fr = self.flop_ratio
        t2 = Table(
            title=f"model ÷ baseline: active params {self.active_param_ratio:.3f}"
            + (f", FLOPs/token {fr:.3f}" if fr else "")
        )
        for col in ("experts impl", "batch", "prefill time ratio", "÷ FLOP ratio", "decode time ratio"):
            t2.add_column(col, justify="right")
        for x in self.ratios():
            t2.add_row(
                str(x["experts_impl"]),
                str(x["batch"]),
                f"{x['prefill_time_ratio']:.3f}",
                f"{x['prefill_time_ratio'] / fr:.3f}" if fr else "—",
                f"{x['decode_time_ratio']:.3f}",
            )
        console.print(t2)
        if self.fastest_experts_impl:
            console.print(f"fastest experts implementation: {self.fastest_experts_impl}")


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _impls_to_try(model: nn.Module, asked: tuple[str, ...] | None) -> tuple[str | None, ...]:
    """The experts implementations to time: those asked for (default: every usable one); (None,) for a dense
    model. Raises MoegraftError for one that is not usable here."""
    available = usable_experts_impls(model)
    if not available:
        return (None,)
    impls = tuple(asked) if asked else available
    bad = [i for i in impls if i not in available]
    if bad:
        raise MoegraftError(
            f"experts implementation(s) {bad} not available here; choose from {list(available)}"
        )
    return impls


def _time_variants(
    variants: list[tuple[str, nn.Module, str | None]],
    batch_sizes: tuple[int, ...],
    prompt_len: int,
    new_tokens: int,
    warmup: int,
    reps: int,
    seed: int,
    progress: bool,
    compile: bool = False,
) -> dict[tuple[int, int], list[tuple[float, float, int | None]]]:
    """(batch, variant index) → the timed runs (prefill s, decode s, peak bytes); the variants alternate within
    every repetition, so drift in the machine's load hits all alike. `compile`: each model runs compiled with a
    static cache (one CompiledDecoder per model, shared by its experts implementations)."""
    model = variants[0][1]
    dev = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    decoders: dict[int, CompiledDecoder] = {}
    if compile:
        for _, m, _ in variants:
            decoders.setdefault(id(m), CompiledDecoder(m, prompt_len + new_tokens))
    times: dict[tuple[int, int], list[tuple[float, float, int | None]]] = {}
    with Progress(len(batch_sizes) * (warmup + reps) * len(variants), "bench", enabled=progress) as bar:
        for B in batch_sizes:
            prompt = torch.randint(0, vocab, (B, prompt_len), generator=g).to(dev)  # (B, T)
            for rep in range(warmup + reps):
                for v, (_, m, impl) in enumerate(variants):
                    if impl is not None:
                        set_experts_impl(m, impl)
                    res = run_once(m, prompt, new_tokens, decoders.get(id(m)))
                    if rep >= warmup:
                        times.setdefault((B, v), []).append(res)
                    bar.advance()
    return times


def _row(
    who: str,
    impl: str | None,
    B: int,
    prompt_len: int,
    new_tokens: int,
    runs: list[tuple[float, float, int | None]],
) -> BenchRow:
    """One BenchRow: the medians of `runs` (prefill s, decode s, peak bytes)."""
    pre = statistics.median(r[0] for r in runs)
    dec = statistics.median(r[1] for r in runs)
    mems = [r[2] for r in runs if r[2] is not None]
    return BenchRow(
        model=who,
        experts_impl=impl,
        batch=B,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        prefill_s=pre,
        decode_s=dec,
        prefill_tok_s=B * prompt_len / pre,
        decode_tok_s=B * new_tokens / dec if dec > 0 else float("nan"),
        peak_mem_bytes=max(mems) if mems else None,
    )


def bench(
    model: nn.Module | str | Path,
    *,
    baseline: nn.Module | str | Path | None = None,
    batch_sizes: tuple[int, ...] = (1, 4, 16),
    prompt_len: int = 128,
    new_tokens: int = 32,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    experts_impls: tuple[str, ...] | None = None,
    warmup: int = 1,
    reps: int = 3,
    seed: int = 0,
    progress: bool = False,
    compile: bool = False,
) -> BenchResult:
    """Prefill / decode throughput and peak memory of the model (each experts implementation) and the baseline.

    Runs alternate within every repetition (model impl 1, impl 2, …, baseline, then again), so that drift
    in the machine's load hits all alike; the median over `reps` is reported after `warmup` runs.

    Args:
        model: a loaded causal LM, or anything `load_causal_lm` accepts.
        baseline: the dense model to compare with, or None.
        batch_sizes: sequences per run.
        prompt_len: prompt tokens per sequence (random ids, fixed seed).
        new_tokens: greedy decode steps (EOS ignored, KV cache on).
        dtype: weights dtype when loading from a source ("float32", "bfloat16", ...; "auto": bf16 on CUDA, fp32
            on CPU, moegraft.device).
        device: "auto" (a CUDA GPU if there is one), "cpu", "cuda", ...
        experts_impls: experts implementations to try, "moegraft" and transformers' (default: all usable; ignored
            for a dense model).
        warmup, reps: untimed and timed runs per configuration.
        compile: run every model (and experts implementation) under `torch.compile` with a static KV cache, CUDA
            graphs on CUDA (moegraft.eval.compiled); at least 2 warm-up runs then, so that compiling and CUDA
            graph recording stay out of the timed runs.

    Returns:
        BenchResult; the model is left on its fastest experts implementation.
    """
    if not batch_sizes or min(batch_sizes) < 1 or prompt_len < 1 or new_tokens < 0 or reps < 1:
        raise MoegraftError("batch sizes and --prompt-len must be >= 1, --new-tokens >= 0, reps >= 1")
    device = str(resolve_device(device))
    dt = default_dtype(torch.device(device)) if dtype == "auto" else as_dtype(dtype)
    model, _, name = resolve_model(model, dtype=dt, device=device, with_tokenizer=False)
    base_name = None
    if baseline is not None:
        baseline, _, base_name = resolve_model(baseline, dtype=dt, device=device, with_tokenizer=False)
    impls = _impls_to_try(model, experts_impls)
    original_impl = current_experts_impl(model)
    variants: list[tuple[str, nn.Module, str | None]] = [("model", model, i) for i in impls]
    if baseline is not None:
        variants.append(("baseline", baseline, current_experts_impl(baseline)))
    dev = next(model.parameters()).device
    if compile:
        warmup = max(warmup, 2)  # the first run compiles, the second records the CUDA graphs
    times = _time_variants(
        variants, batch_sizes, prompt_len, new_tokens, warmup, reps, seed, progress, compile
    )
    rows = [
        _row(who, impl, B, prompt_len, new_tokens, times[(B, v)])
        for v, (who, _, impl) in enumerate(variants)
        for B in batch_sizes
    ]
    fastest = None
    if impls != (None,):
        fastest = min(
            impls,
            key=lambda i: sum(
                r.prefill_s + r.decode_s for r in rows if r.model == "model" and r.experts_impl == i
            ),
        )
        set_experts_impl(model, fastest)
    elif original_impl is not None:
        set_experts_impl(model, original_impl)
    weight_bytes = {"model": _weight_bytes(model)}
    if baseline is not None:
        weight_bytes["baseline"] = _weight_bytes(baseline)
    notes = [
        "prefill = one forward over the prompt with logits at every position; decode = greedy steps "
        "through the KV cache, EOS ignored",
        "peak memory = high-water mark above the level before the run (weights excluded): "
        + ("CUDA allocator" if dev.type == "cuda" else "process RSS (VmHWM)"),
        "FLOPs/token from moegraft.plan: 2 × active matmul weights + attention at mean context prompt_len / 2",
    ]
    if compile:
        notes.append(
            "compiled: torch.compile of each model's forward over a static KV cache"
            + (", mode reduce-overhead (CUDA graphs)" if dev.type == "cuda" else "")
            + f"; {warmup} warm-up runs"
        )
    return BenchResult(
        model=name,
        baseline=base_name,
        dtype=str(dt).removeprefix("torch."),
        device=str(dev),
        reps=reps,
        rows=rows,
        model_cost=cost_of(model, prompt_len),
        baseline_cost=None if baseline is None else cost_of(baseline, prompt_len),
        weight_bytes=weight_bytes,
        fastest_experts_impl=fastest,
        notes=notes,
        compiled=compile,
    )
