"""Frozen pydantic specs: what the user asks for, validated before any weight is read.

The resolved spec is written as `moegraft.json` next to every output, so a result can be
reproduced from its own folder.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moegraft.errors import SpecError

FormatName = Literal["auto", "gemma4", "qwen2_moe", "glm4_moe", "qwen3_5_moe", "gemma_moe"]
InitName = Literal["neurons", "zero", "upcycle", "carve"]
RouterInitName = Literal["auto", "kmeans", "random"]
SplitName = Literal["activation", "random"]
CarveFitName = Literal["sequential", "lstsq", "none"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def flag_names(*decls: str) -> dict:
    """A field's `json_schema_extra` when its option is not `--field-name`: another name, a short alias, or a
    switch (`--x` alone, where a bool would otherwise get `--x/--no-x`). moegraft.options reads it."""
    return {"flags": list(decls)}


class GraftSpec(BaseModel):
    """How to graft routed experts onto every selected dense FFN.

    `num_experts` (E) experts of `expert_size` (I_e) neurons each, `top_k` (K) of them per token,
    added beside the dense FFN, which stays always on.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_experts: int = Field(
        8, description="E: routed experts per MoE layer", json_schema_extra=flag_names("--experts", "-E")
    )
    top_k: int = Field(
        2, description="K: experts chosen per token", json_schema_extra=flag_names("--top-k", "-K")
    )
    expert_size: int = Field(
        256,
        description="I_e: intermediate size of each routed expert",
        json_schema_extra=flag_names("--expert-size", "-I"),
    )
    layers: str = Field("all", description="'all', a list/range like '0-3,8', or 'every:N'")
    init: InitName = Field(
        "neurons",
        description="neurons: experts copy the dense neurons that fire most on their tokens (output zero); "
        "zero: random inputs, zero output; upcycle: copies/slices of the dense FFN; carve: split the dense FFN",
    )
    router_init: RouterInitName = Field(
        "auto",
        description="kmeans: router fitted to calibration text (balanced k-means, equal loads); random; "
        "auto: kmeans unless the init needs a zero router (upcycled copies) or fits its own (carve)",
    )
    router_entropy: float = Field(
        0.6, description="kmeans router: target mean H/ln E on held-out calibration tokens (1 = uniform)"
    )
    format: FormatName = Field("auto", description="output format")
    dtype: DtypeName = Field("auto", description="dtype of the written weights (auto: the source's)")
    seed: int = Field(0, description="seed for random expert and router weights")
    noise: float = Field(0.0, description="upcycle: relative std of noise on copied expert inputs")
    router_std: float = Field(0.02, description="zero init: std of the random router weights")
    norm_topk_prob: bool = Field(
        False, description="Qwen2-MoE/GLM: renormalise top-k weights (llama.cpp supports only false)"
    )
    llama_cpp: bool = Field(
        False,
        description="Qwen2-MoE: llama.cpp-friendly output (untied head, tiny non-zero shared gate), still exact",
        json_schema_extra=flag_names("--llama-cpp"),
    )
    # carve: the dense FFN itself becomes S shared neurons + E experts of (I - S)/E (expert_size is derived)
    shared_size: int | None = Field(
        None,
        description="carve: S, dense neurons kept always on (shared expert)",
        json_schema_extra=flag_names("--shared-size", "-S"),
    )
    calib_data: str = Field(
        "stdlib:train",
        description="calibration text for kmeans routers, neurons and carve (what --data accepts)",
    )
    calib_tokenizer: str | None = Field(
        None,
        description="tokenizer for --calib-data (directory, hub id or .gguf; default: SRC's); copied into the "
        "output when SRC has none",
    )
    calib_tokens: int = Field(8192, description="calibration tokens")
    split: SplitName = Field("activation", description="carve: group neurons by co-activation, or at random")
    carve_fit: CarveFitName = Field(
        "sequential",
        description="carve: refit every down projection by least squares so the carved FFN (shared + routed "
        "top-K) matches the dense FFN on calibration tokens, fed by the carved layers before (sequential) or by "
        "the dense model (lstsq); none keeps the dense columns",
    )

    @model_validator(mode="after")
    def _check(self) -> GraftSpec:
        if self.num_experts < 1:
            raise ValueError(f"--experts must be >= 1 (got {self.num_experts})")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1 (got {self.top_k})")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"--top-k {self.top_k} > --experts {self.num_experts}: a token cannot pick more experts "
                "than exist; lower --top-k or raise --experts"
            )
        if self.expert_size <= 0:
            raise ValueError(f"--expert-size must be > 0 (got {self.expert_size})")
        if self.noise < 0:
            raise ValueError(f"--noise must be >= 0 (got {self.noise})")
        if self.llama_cpp and self.norm_topk_prob:
            raise ValueError("--llama-cpp needs --no-norm-topk-prob: llama.cpp's qwen2moe never renormalises")
        if self.llama_cpp and self.format == "glm4_moe":
            raise ValueError("--llama-cpp applies to --format qwen2_moe (or auto), not glm4_moe")
        parse_layers(self.layers, None)  # syntax check now; range check once the depth is known
        if self.calib_tokens < 1:
            raise ValueError(f"--calib-tokens must be >= 1 (got {self.calib_tokens})")
        if not 0 < self.router_entropy < 1:
            raise ValueError(f"--router-entropy must be in (0, 1) (got {self.router_entropy})")
        if self.init == "carve" and self.router_init == "kmeans":
            raise ValueError("--init carve fits its own router to the data; drop --router-init kmeans")
        if self.init == "carve":
            if self.shared_size is None:
                raise ValueError("--init carve needs --shared-size S (dense neurons kept always on)")
            if self.shared_size < 1:
                raise ValueError(f"--shared-size must be >= 1 (got {self.shared_size})")
        elif self.shared_size is not None:
            raise ValueError("--shared-size only applies to --init carve")
        return self

    @classmethod
    def build(cls, **kwargs) -> GraftSpec:
        """Construct a spec, turning pydantic's multi-line report into one SpecError line."""
        return build_spec(cls, kwargs)


class ConvertRun(BaseModel):
    """How `moegraft convert` runs: shard size, device, overwriting, remote code, progress; not what it computes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_shard_size: str = Field("2GB", description="largest output shard, e.g. 2GB")
    device: str = Field(
        "auto",
        description="where calibration (router fit, neuron scores, carve refit) runs, one layer at a time, in fp32: "
        "auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N",
    )
    overwrite: bool = Field(False, description="replace OUT if it exists")
    trust_remote_code: bool = Field(False, description="allow custom model code (off by default)")
    progress: bool = Field(True, description="show a progress bar")


def build_spec(cls: type[BaseModel], kwargs: dict):
    """`cls(**kwargs)`, with pydantic's multi-line ValidationError turned into one SpecError line."""
    try:
        return cls(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        loc = ".".join(str(p) for p in err["loc"])
        raise SpecError(f"{loc}: {msg}" if loc else msg) from None


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_layers(spec: str, num_layers: int | None) -> list[int] | None:
    """Resolve a layer selection to sorted indices.

    Args:
        spec: "all", "every:N" (layers N-1, 2N-1, ... as Qwen's decoder_sparse_step), or "0-3,8,10".
        num_layers: depth of the model; None only checks the syntax.

    Returns:
        Sorted layer indices, or None when num_layers is None.
    """
    s = spec.strip().lower()
    if s == "all":
        return None if num_layers is None else list(range(num_layers))
    if s.startswith("every:"):
        try:
            n = int(s.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise SpecError(f"--layers {spec!r}: 'every:N' needs a whole N >= 1, e.g. every:2")
        return None if num_layers is None else [i for i in range(num_layers) if (i + 1) % n == 0]
    out: set[int] = set()
    for part in s.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise SpecError(f"--layers {spec!r}: use 'all', 'every:N' or a list like '0-3,8'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SpecError(f"--layers {spec!r}: range {lo}-{hi} runs backwards")
        out.update(range(lo, hi + 1))
    if num_layers is None:
        return None
    bad = sorted(i for i in out if i >= num_layers)
    if bad:
        raise SpecError(f"--layers {spec!r}: layer {bad[0]} does not exist (the model has {num_layers})")
    return sorted(out)
