"""What `moegraft eval` and `moegraft bench` measure, as frozen pydantic models: each field is one option.

In: command-line options or library kwargs. Out: EvalSpec / BenchSpec, whose fields are the keyword arguments of
`evaluate` / `bench` (plus where bench's JSON goes). Imports no torch, so that `moegraft --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from moegraft.config import DtypeName, flag_names

DEVICE_HELP = "auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:1, mps"


class EvalSpec(BaseModel):
    """How to score a model: on which text, how much of it, against which baseline, and where to report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    baseline: str | None = Field(None, description="dense model to compare with (same tokenizer)")
    data: str = Field(
        "stdlib:heldout", description="stdlib:heldout, a .txt/.jsonl/.parquet file or folder, or a dataset"
    )
    retain_data: str | None = Field(
        None, description="a second dataset (other text): perplexity/KL there show forgetting"
    )
    max_tokens: int = Field(8192, description="evaluate at most this many tokens")
    seq_len: int = Field(256, description="tokens per block")
    batch_size: int = Field(2, description="blocks per forward")
    report_dir: Path | None = Field(
        None,
        description="write report.md, report.json and PNG plots here",
        json_schema_extra=flag_names("--report"),
    )
    lm_eval_tasks: str | None = Field(
        None,
        description="lm-eval tasks: names and/or local task .yaml files, comma-separated",
        json_schema_extra=flag_names("--lm-eval"),
    )
    lm_eval_limit: int | None = Field(None, description="at most this many documents per lm-eval task")
    device: str = Field("auto", description=DEVICE_HELP)
    dtype: DtypeName = Field(
        "auto", description="weights dtype of model and baseline; auto: bfloat16 on CUDA, float32 on CPU"
    )
    progress: bool = Field(True, description="show a progress bar")


class BenchSpec(BaseModel):
    """What to time: batch sizes, prompt and decode lengths, experts implementations, repetitions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    baseline: str | None = Field(None, description="dense model to compare with")
    batch_sizes: tuple[int, ...] = Field((1, 4, 16), description="comma-separated batch sizes")
    prompt_len: int = Field(128, description="prompt tokens per sequence")
    new_tokens: int = Field(32, description="greedy decode steps (EOS ignored)")
    dtype: DtypeName = Field("auto", description="weights dtype; auto: bfloat16 on CUDA, float32 on CPU")
    device: str = Field("auto", description=DEVICE_HELP)
    experts_impls: tuple[str, ...] | None = Field(
        None,
        description="comma-separated experts implementations: moegraft, eager, grouped_mm, batched_mm "
        "(default: all)",
        json_schema_extra=flag_names("--experts-impls"),
    )
    reps: int = Field(3, description="timed repetitions (median reported)")
    warmup: int = Field(1, description="untimed warm-up runs")
    compile: bool = Field(
        False,
        description="run every model under torch.compile with a static KV cache (CUDA graphs on CUDA); "
        "the warm-up runs compile",
    )
    json_path: Path | None = Field(
        None, description="also write the result as JSON here", json_schema_extra=flag_names("--json")
    )
    progress: bool = Field(True, description="show a progress bar")
