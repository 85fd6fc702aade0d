"""llama.cpp's own converter and runtime, found at run time, never copied into moegraft.

In: an export-ready HF directory. Out: a GGUF written by the `convert_hf_to_gguf.py` that ships with the
installed llama-cpp-python (its sdist vendors llama.cpp), cached under ~/.cache/moegraft/llama.cpp-VERSION.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from moegraft.export.base import ExportError
from moegraft.io.atomic import clean_stale, temp_path

INSTALL_HINT = "pip install 'moegraft[export]' (builds llama.cpp from source, ~10 min on 2 cores)"
# What the converter needs from the sdist's vendor/llama.cpp: the script, its model classes, its gguf-py.
_NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def installed_version() -> str | None:
    """Version of the installed llama-cpp-python, or None."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_root() -> Path:
    base = (
        os.environ.get("MOEGRAFT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "moegraft"
    )
    return Path(base).expanduser()


def converter_script(*, download: bool = True) -> Path:
    """`convert_hf_to_gguf.py` of the llama.cpp that the installed llama-cpp-python runs.

    Looks in $MOEGRAFT_LLAMA_CPP_DIR (a llama.cpp checkout), then the cache; else fetches the matching sdist
    with pip (or uses `llama_cpp_python-VERSION.tar.gz` already in the cache) and extracts the converter.
    """
    if env := os.environ.get("MOEGRAFT_LLAMA_CPP_DIR"):
        script = Path(env).expanduser() / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise ExportError(
                f"MOEGRAFT_LLAMA_CPP_DIR={env} has no convert_hf_to_gguf.py; point it at llama.cpp"
            )
        return script
    version = installed_version()
    if version is None:
        raise ExportError(f"llama-cpp-python is not installed: {INSTALL_HINT}")
    root = cache_root()
    dest = root / f"llama.cpp-{version}"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest / "convert_hf_to_gguf.py"
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        if not download:
            raise ExportError(f"no {sdist}; run once with network access to fetch llama.cpp's converter")
        root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        r = subprocess.run(
            [*cmd, f"llama-cpp-python=={version}", "-d", str(root)], capture_output=True, text=True
        )
        if r.returncode != 0 or not sdist.is_file():
            raise ExportError(
                f"cannot fetch llama-cpp-python {version} sdist for its converter: {_last_line(r)}"
            )
    _extract(sdist, dest)
    return dest / "convert_hf_to_gguf.py"


def _extract(sdist: Path, dest: Path) -> None:
    clean_stale(dest.parent, name=dest.name)  # what a killed extraction left
    tmp = temp_path(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            _, sep, rel = m.name.partition("/vendor/llama.cpp/")
            if sep and rel.startswith(_NEEDED) and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise ExportError(f"{sdist} ships no vendor/llama.cpp/convert_hf_to_gguf.py")
        tar.extractall(tmp, members=members, filter="data")
    if dest.exists():  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(dest)


def run_converter(
    model_dir: Path,
    outfile: Path,
    outtype: str,
    log: Path | None = None,
    hparams: dict | None = None,
    flags: tuple[str, ...] = (),
) -> None:
    """Run llama.cpp's converter on `model_dir` in a subprocess, writing `outfile`.

    Args:
        hparams: what the converter's model class reads as the config (default: its own
            `AutoConfig.from_pretrained(model_dir).to_dict()`, through `convert_hf_to_gguf.py`).
        flags: extra command-line flags of `convert_hf_to_gguf.py` (with `hparams`: only `--no-mtp`).

    Raises:
        ExportError: with the converter's last error line (its whole output goes to `log`).
    """
    script = converter_script()
    # absolute paths: the converter runs from its own directory, so it finds its `conversion` package
    model_dir, outfile = Path(model_dir).resolve(), Path(outfile).resolve()
    cmd = [
        sys.executable,
        str(script),
        str(model_dir),
        "--outfile",
        str(outfile),
        "--outtype",
        outtype,
        *flags,
    ]
    if hparams is not None:
        job = {
            "script_dir": str(script.parent),
            "model_dir": str(model_dir),
            "outfile": str(outfile),
            "outtype": outtype,
            "hparams": hparams,
            "no_mtp": "--no-mtp" in flags,
        }
        job_file = outfile.with_name(outfile.name + ".job.json")
        job_file.write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "moegraft.export.converter_main", str(job_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=script.parent)
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    if r.returncode != 0 or not outfile.is_file():
        raise ExportError(f"llama.cpp's converter ({script}) failed: {_last_line(r)}")


def _last_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (r.stderr or r.stdout or "").splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {r.returncode}"


def open_llama(gguf: str | Path, *, n_ctx: int, logits_all: bool = True, n_threads: int | None = None):
    """A llama-cpp-python `Llama` on `gguf` with an fp32 KV cache (the default fp16 cache adds ~1e-2)."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"llama-cpp-python is not installed: {INSTALL_HINT}") from None
    kw = {}
    if hasattr(llama_cpp, "GGML_TYPE_F32"):
        kw = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    return llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=logits_all,
        n_threads=n_threads or min(os.cpu_count() or 1, 8),
        seed=0,
        verbose=False,
        **kw,
    )
