"""What `moegraft parity` runs, as a frozen pydantic model: each field is one option.

In: command-line options. Out: ParitySpec, whose fields (as_json aside) are run_parity's keyword arguments.
Imports no torch, so that `moegraft --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from moegraft.config import flag_names

RUNTIMES = ("transformers", "vllm", "llama.cpp")


class ParitySpec(BaseModel):
    """Which runtimes run which prompts, and how many tokens each generates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtimes: tuple[str, ...] = Field(
        RUNTIMES, description="comma-separated: transformers, vllm, llama.cpp (transformers is the reference)"
    )
    data: str = Field(
        "stdlib:heldout", description="text the prompts are cut from (file, folder, stdlib:heldout, ...)"
    )
    new_tokens: int = Field(
        32, description="greedy tokens generated after each prompt", json_schema_extra=flag_names("--tokens")
    )
    n_prompts: int = Field(
        4, description="prompts, one per document of --data", json_schema_extra=flag_names("--prompts")
    )
    prompt_tokens: int = Field(32, description="tokens per prompt")
    vllm_python: Path | None = Field(
        None, description="a python that imports vllm (default: the venv scripts/vllm_venv.sh builds)"
    )
    vllm_url: str | None = Field(
        None, description="a running OpenAI-compatible vLLM server serving MODEL (instead of a python)"
    )
    as_json: bool = Field(
        False, description="print the report as JSON", json_schema_extra=flag_names("--json")
    )
