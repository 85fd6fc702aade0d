"""What `moegraft export` writes and checks, as a frozen pydantic model: each field is one option.

In: command-line options. Out: ExportSpec, whose first fields are export_gguf's keyword arguments. Imports no
torch, so that `moegraft --help` stays fast; the GGUF type names are declared here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moegraft.config import flag_names

OutType = Literal["f32", "f16", "bf16", "q8_0"]
ExpertsType = Literal["q8_0", "q4_0", "q4_k", "q3_k", "q2_k"]
# export_gguf's keyword arguments among ExportSpec's fields; the rest say what is checked and printed
WRITE_FIELDS = ("outtype", "experts_type", "imatrix", "dense", "overwrite")


class ExportSpec(BaseModel):
    """Which GGUF types to write, and how to check the result against transformers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    outtype: OutType = Field(
        "f32", description="GGUF type of every weight but the routed experts (f32 is exact)"
    )
    experts_type: ExpertsType | None = Field(
        None,
        description="routed experts (ffn_*_exps) quantised to this by llama.cpp's quantiser; rest at --outtype",
    )
    imatrix: Path | None = Field(
        None, description="GGUF importance matrix (llama-imatrix) for llama.cpp's quantiser"
    )
    dense: bool = Field(
        False,
        description="MODEL is a dense Llama/Mistral/Qwen2 (dir, hub id, .gguf): same converter",
        json_schema_extra=flag_names("--dense"),
    )
    check: bool = Field(
        False,
        description="run the GGUF in llama.cpp and compare logits with transformers",
        json_schema_extra=flag_names("--check"),
    )
    tokens: int = Field(256, description="--check: tokens of held-out prose to compare")
    check_data: str | None = Field(
        None,
        description="perplexity in llama.cpp and in transformers on this text (file, folder, stdlib:heldout, ...)",
    )
    check_tokens: int = Field(4096, description="--check-data: tokens to score")
    seq_len: int = Field(256, description="--check-data: tokens per scored block")
    overwrite: bool = Field(False, description="replace OUT.gguf if it exists")
    as_json: bool = Field(
        False, description="print the result as JSON", json_schema_extra=flag_names("--json")
    )
