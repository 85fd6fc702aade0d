"""llama.cpp's own quantiser, per tensor class: routed experts at one type, everything else at another.

In: an f32 GGUF written by llama.cpp's converter, the two types, optionally an importance matrix. Out: a GGUF
quantised by `llama_model_quantize` (the libllama llama-cpp-python ships), and the types it actually wrote.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from moegraft.export.base import ExportError

# every type this module hands llama.cpp (the benchmark also quantises the whole model uniformly)
GGMLType = Literal[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_0", "q5_k", "q4_1", "q4_0", "q4_k", "q3_k", "q2_k"
]
# llama.cpp's routed-expert stacks (qwen2moe: ffn_{gate,up,down}_exps); not the shared expert (`_shexp`)
EXPERTS_PATTERN = r"ffn_(gate|up|down|gate_up)_exps\.weight"
_EXPERTS = re.compile(EXPERTS_PATTERN)
# bits per weight of each type (block bytes × 8 / block size), for free-space checks and size estimates
BITS = {
    "f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.5625, "q5_1": 6.0, "q5_0": 5.5, "q5_k": 5.5,
    "q4_1": 5.0, "q4_0": 4.5, "q4_k": 4.5, "q3_k": 3.4375, "q2_k": 2.625,
}  # fmt: skip
# a quantised type's llama_ftype (llama.cpp's mix whose default tensor type it is)
_FTYPE = {
    "f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_k": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q3_k": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}  # fmt: skip
_UNQUANTISED = ("f32", "f16", "bf16")
# llama.cpp's substitutes when a row length is not a multiple of the type's block (llama-quant.cpp
# `tensor_type_fallback`); a substitute that does not fit either becomes f16. Data, for checking what was written.
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
# types whose llama.cpp quantiser weighs rows by an importance matrix (q8_0 and float types ignore it)
USES_IMATRIX = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


@dataclass(frozen=True)
class QuantPlan:
    """What to ask llama.cpp for: `rest` for every tensor it quantises, `experts` for the routed experts."""

    rest: GGMLType
    experts: GGMLType | None = None
    imatrix: str | None = None  # path of a GGUF importance matrix

    def ftype(self) -> str:
        # llama.cpp applies tensor-type overrides only when the file type's default type is quantised
        return _FTYPE[self.experts if self.experts else self.rest]

    def overrides(self) -> list[tuple[str, str]]:
        """(regex, type) pairs, first match wins; a catch-all pins every other tensor to `rest`."""
        if self.experts is None:
            return []
        return [(EXPERTS_PATTERN, self.experts), (r".*", self.rest)]


def quantize_gguf(
    src: Path, dst: Path, plan: QuantPlan, *, log: Path | None = None, n_threads: int = 0
) -> None:
    """Quantise `src` (f32 GGUF) into `dst` with llama.cpp, in a subprocess (its aborts cannot kill ours).

    Raises:
        ExportError: llama.cpp's last error line (its whole log goes to `log`).
    """
    job = {"src": str(src), "dst": str(dst), "plan": plan.__dict__, "n_threads": n_threads}
    r = subprocess.run(
        [sys.executable, "-m", "moegraft.export.quantize", json.dumps(job)], capture_output=True, text=True
    )
    if log is not None:
        with open(log, "a") as f:
            f.write(r.stdout + r.stderr)
    if r.returncode != 0 or not dst.is_file():
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "error" in ln.lower() or "failed" in ln.lower()), None)
        raise ExportError(f"llama.cpp's quantiser failed: {why or (lines[-1] if lines else r.returncode)}")


def _run(src: str, dst: str, plan: QuantPlan, n_threads: int) -> int:
    """The subprocess: fill llama_model_quantize_params (C structs in llama.cpp ≥ 0.3.36) and call it."""
    import ctypes

    import llama_cpp
    from gguf import GGMLQuantizationType

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = n_threads
    params.ftype = getattr(llama_cpp, plan.ftype())
    params.pure = plan.experts is None  # a uniform plan means every quantisable tensor at `rest`
    keep = []  # ctypes buffers must outlive the call
    if pairs := plan.overrides():
        arr = (llama_cpp.llama_model_tensor_override * (len(pairs) + 1))()
        for i, (pattern, t) in enumerate(pairs):
            arr[i].pattern = pattern.encode()
            # gguf's enum mirrors ggml's (the bindings have no GGML_TYPE_BF16)
            arr[i].type = int(GGMLQuantizationType[t.upper()])
        arr[len(pairs)].pattern = None  # terminator
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(arr)
    if plan.imatrix:
        entries = read_imatrix(Path(plan.imatrix))
        arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for i, (name, values) in enumerate(entries.items()):
            keep.append(values)
            arr[i].name, arr[i].size = name.encode(), values.size
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[len(entries)].name = None
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    llama_cpp.llama_backend_init()
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """An importance matrix as `llama-imatrix` writes it (GGUF: `NAME.in_sum2` and `NAME.counts` per tensor),
    normalised the way `llama-quantize` does: mean squared activation per column, per expert (1 where unseen).

    Raises:
        ExportError: the file is not a GGUF imatrix.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception:
        raise ExportError(
            f"{path}: not a GGUF imatrix; write one with llama.cpp's `llama-imatrix` (its default output format), "
            "or convert a legacy .dat with `llama-imatrix --in-file X.dat -o X.gguf`"
        ) from None
    t = {x.name: np.asarray(x.data, dtype=np.float32) for x in reader.tensors}
    out = {}
    for key, sums in t.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key.removesuffix(".in_sum2")
        counts = t.get(f"{name}.counts")
        if counts is None:
            raise ExportError(f"{path}: {name} has in_sum2 but no counts; regenerate the imatrix")
        sums = sums.reshape(counts.size, -1)  # (n_experts, n_per_row)
        c = counts.reshape(-1, 1)
        out[name] = np.ascontiguousarray(
            np.where(c > 0, sums / np.maximum(c, 1), 1.0).ravel(), dtype=np.float32
        )
    if not out:
        raise ExportError(f"{path}: no imatrix entries (NAME.in_sum2 / NAME.counts); regenerate it")
    return out


# ---------------------------------------------------------------------------------------------
# What was written


def tensor_class(name: str) -> str:
    """'experts' for routed-expert stacks, 'router' for the routers, else 'rest'."""
    if _EXPERTS.search(name):
        return "experts"
    if "ffn_gate_inp." in name:
        return "router"
    return "rest"


def type_summary(types: dict[str, str]) -> dict[str, dict[str, int]]:
    """Tensor class -> {type: count}."""
    out: dict[str, Counter] = {}
    for name, t in types.items():
        out.setdefault(tensor_class(name), Counter())[t] += 1
    return {c: dict(sorted(v.items())) for c, v in sorted(out.items())}


def substitutions(types: dict[str, str], rows: dict[str, int], plan: QuantPlan) -> list[str]:
    """One line per expert tensor kind that llama.cpp wrote at another type than asked (its fallbacks), with why.

    Args:
        types, rows: GGUF tensor name -> type written, row length (ne[0], which decides the fallback).
    """
    if plan.experts is None:
        return []
    seen: dict[tuple[str, str, str], tuple[int, int]] = {}
    for name, t in types.items():
        asked = plan.experts if tensor_class(name) == "experts" else None
        if asked is None or t == asked:
            continue
        kind = re.sub(r"^blk\.\d+\.", "blk.*.", name)
        n, row = seen.get((kind, asked, t), (0, rows[name]))
        seen[(kind, asked, t)] = (n + 1, row)
    return [
        f"{kind}: {asked} -> {t} in {n} tensors (llama.cpp's fallback: row length {row} is not a multiple of "
        f"{block_size(asked)})"
        for (kind, asked, t), (n, row) in seen.items()
    ]


def expected_type(asked: str, row: int) -> str:
    """The type llama.cpp writes for a tensor of row length `row` asked to be `asked`."""
    if asked in _UNQUANTISED or row % block_size(asked) == 0:
        return asked
    sub = FALLBACK.get(asked, asked)
    return sub if row % block_size(sub) == 0 else "f16"


def check_types(types: dict[str, str], rows: dict[str, int], dims: dict[str, int], plan: QuantPlan) -> None:
    """Every routed-expert stack at `plan.experts` and every other quantisable weight at `plan.rest`, or at
    llama.cpp's documented substitute for its row length.

    Raises:
        ExportError: naming the first tensor llama.cpp wrote otherwise.
    """
    for name, t in types.items():
        cls = tensor_class(name)
        if cls == "router" or dims[name] < 2 or not name.endswith(".weight"):
            continue  # llama.cpp keeps routers, norms, biases and 1-D gates at f32
        asked = plan.experts if cls == "experts" and plan.experts else plan.rest
        if t != (want := expected_type(asked, rows[name])):
            raise ExportError(
                f"llama.cpp wrote {name} as {t}, asked for {asked} (expected {want}); report this with the log"
            )


def block_size(t: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]][0]


def tensor_layout(gguf: Path) -> tuple[dict[str, str], dict[str, int], dict[str, int]]:
    """(type, row length ne[0], number of dimensions) of every tensor in `gguf`, read with gguf's reader."""
    from gguf import GGUFReader

    ts = GGUFReader(gguf).tensors
    return (
        {t.name: t.tensor_type.name.lower() for t in ts},
        {t.name: int(t.shape[0]) for t in ts},
        {t.name: len(t.shape) for t in ts},
    )


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    sys.exit(_run(job["src"], job["dst"], QuantPlan(**job["plan"]), job["n_threads"]))
