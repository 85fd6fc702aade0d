"""Out-of-core benchmark: peak memory and wall time of `moegraft.convert` vs a plain copy of the same bytes.

Generates synthetic random Llama checkpoints (~1 GB and ~8 GB by default, bf16, sharded safetensors with
`model.safetensors.index.json`, written one tensor at a time), converts each to Qwen2-MoE
(8 experts of 256, top-2, zero init, dtype auto) in a fresh subprocess under `/usr/bin/time -v`, and
times `cp -r` and `shutil.copytree` of the source directory in the same run, alternating copy and
convert. Each measured process also runs a sampler thread reading /proc/self/status (VmRSS, RssAnon,
RssFile) every 20 ms, so file-backed pages (safetensors mmaps) can be told apart from heap.

The page cache cannot be dropped here (no root over the VM): the source is warm in the page cache for
every run, copies and conversions alike. `sync` runs (untimed) before each measured run so that no run
pays for the previous run's dirty pages; runs do not fsync their own output (neither does `cp`).

Usage:
    python benchmarks/bench_convert_memory.py                 # 1 GB and 8 GB, 2 reps
    python benchmarks/bench_convert_memory.py --sizes 1 --reps 1
Writes benchmarks/results/bench_convert_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# TinyLlama-1.1B shapes; depth is chosen to reach the requested size.
SHAPE = dict(
    hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000
)
SPEC = dict(num_experts=8, top_k=2, expert_size=256, init="zero", format="qwen2_moe", dtype="auto")


# ---------------------------------------------------------------------------------------------------------
# synthetic checkpoint, written in bounded memory


def llama_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    H, I, V = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = H // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (H,)),
            (p + "self_attn.q_proj.weight", (H, H)),
            (p + "self_attn.k_proj.weight", (kv, H)),
            (p + "self_attn.v_proj.weight", (kv, H)),
            (p + "self_attn.o_proj.weight", (H, H)),
            (p + "post_attention_layernorm.weight", (H,)),
            (p + "mlp.gate_proj.weight", (I, H)),
            (p + "mlp.up_proj.weight", (I, H)),
            (p + "mlp.down_proj.weight", (H, I)),
        ]
    out += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layers_for(target_bytes: float, elt: int) -> int:
    per_layer = sum(numel(s) for _, s in llama_tensors(1)) - sum(numel(s) for _, s in llama_tensors(0))
    fixed = sum(numel(s) for _, s in llama_tensors(0))
    return max(1, round((target_bytes / elt - fixed) / per_layer))


def make_checkpoint(
    path: Path, target_gb: float, dtype: str = "bfloat16", shard_bytes: int = 2 * 10**9
) -> dict:
    """Write a random Llama checkpoint of about `target_gb` GB; one tensor in memory at a time."""
    import torch

    tdtype = getattr(torch, dtype)
    elt = torch.empty((), dtype=tdtype).element_size()
    st_dtype = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}[dtype]
    layers = layers_for(target_gb * 1e9, elt)
    tensors = llama_tensors(layers)
    shards: list[list[tuple[str, tuple[int, ...]]]] = []
    size = 0
    for name, shape in tensors:
        nb = numel(shape) * elt
        if not shards or (size + nb > shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    path.mkdir(parents=True)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    t0 = time.perf_counter()
    for fname, shard in zip(files, shards, strict=True):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nb = numel(shape) * elt
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / fname, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for name, shape in shard:
                if name.endswith("norm.weight"):
                    t = torch.ones(shape, dtype=tdtype)
                else:
                    t = torch.empty(shape, dtype=tdtype).normal_(0.0, 0.02, generator=gen)
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t
    total = sum(numel(s) for _, s in tensors) * elt
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **SHAPE,
        "num_hidden_layers": layers,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return {
        "layers": layers,
        "params": total // elt,
        "bytes": dir_bytes(path),
        "shards": len(files),
        "gen_seconds": round(time.perf_counter() - t0, 1),
        "dtype": dtype,
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------------------
# measured worker (runs in its own process under /usr/bin/time -v)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak VmRSS / RssAnon / RssFile of this process, sampled every `dt` seconds, plus a coarse timeline."""

    def __init__(self, dt: float = 0.02):
        super().__init__(daemon=True)
        self.dt, self.stop, self.peak, self.timeline, self.t0 = (
            dt,
            threading.Event(),
            {},
            [],
            time.perf_counter(),
        )

    def run(self) -> None:
        last = -1.0
        while not self.stop.is_set():
            s = _status()
            for k, v in s.items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            t = time.perf_counter() - self.t0
            if t - last >= 0.5:
                self.timeline.append((round(t, 2), s["VmRSS"], s["RssAnon"], s["RssFile"]))
                last = t
            time.sleep(self.dt)

    def finish(self) -> dict:
        self.stop.set()
        self.join()
        s = _status()
        for k, v in s.items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        return {"peak": self.peak, "timeline": self.timeline}


def worker(kind: str, src: str, dst: str, report: str) -> None:
    sampler = Sampler()
    t_import = time.perf_counter()
    if kind == "convert":
        from moegraft.config import GraftSpec
        from moegraft.convert import convert

        imported = _status()
        sampler.start()
        t0 = time.perf_counter()
        res = convert(src, dst, GraftSpec(**SPEC), max_shard_size="2GB", progress=False)
        secs = time.perf_counter() - t0
        extra = {"tensors": res.tensors, "bytes_planned": res.bytes_written}
    elif kind == "copytree":
        imported = _status()
        sampler.start()
        t0 = time.perf_counter()
        shutil.copytree(src, dst)
        secs = time.perf_counter() - t0
        extra = {}
    elif kind == "import":  # baseline: interpreter + torch + moegraft, no work
        from moegraft.convert import convert  # noqa: F401

        imported = _status()
        sampler.start()
        t0 = time.perf_counter()
        secs = 0.0
        extra = {}
    else:
        raise SystemExit(f"unknown worker kind {kind}")
    mem = sampler.finish()
    Path(report).write_text(
        json.dumps(
            {
                "kind": kind,
                "seconds_inner": secs,
                "after_import": imported,
                "import_seconds": t0 - t_import,
                **mem,
                **extra,
            }
        )
    )


# ---------------------------------------------------------------------------------------------------------
# driver


def time_v(cmd: list[str]) -> dict:
    """Run `cmd` under /usr/bin/time -v; wall seconds and max RSS (bytes)."""
    sync()
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", p.stderr))
    return {"wall": wall, "max_rss": int(m.group(1)) * 1024 if m else None, "cpu": cpu}


def sync() -> None:
    subprocess.run(["sync"], check=True)


def measure(kind: str, src: Path, dst: Path, work: Path) -> dict:
    if dst.exists():
        shutil.rmtree(dst)
    report = work / f"report-{kind}.json"
    if kind == "cp":
        r = time_v(["cp", "-r", str(src), str(dst)])
    else:
        r = time_v(
            [sys.executable, str(Path(__file__).resolve()), "_worker", kind, str(src), str(dst), str(report)]
        )
        r["inner"] = json.loads(report.read_text())
        report.unlink()
    r["out_bytes"] = dir_bytes(dst) if dst.exists() else 0
    if dst.exists():
        shutil.rmtree(dst)
    return r


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,8", help="target source sizes in GB, comma separated")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument(
        "--src-shard-gb", type=float, default=2.0, help="source shard size (HF writes 2-5 GB shards)"
    )
    ap.add_argument("--workdir", default=f"/tmp/moegraft-bench-mem-{os.getpid()}")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--out", default=str(RESULTS / "bench_convert_memory.json"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}; free disk {shutil.disk_usage(work).free / 1e9:.0f} GB", flush=True)
    results: dict = {
        "spec": SPEC,
        "shape": SHAPE,
        "reps": args.reps,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "notes": [
            "page cache not dropped (no root); source warm in cache for all runs",
            "sync (untimed) before every measured run; runs do not fsync their output",
            "max_rss = /usr/bin/time -v 'Maximum resident set size' (includes file-backed mmap pages)",
        ],
        "sizes": [],
    }
    try:
        base = measure("import", work, work / "none", work)
        results["import_baseline"] = {
            "max_rss": base["max_rss"],
            "wall": base["wall"],
            "RssAnon": base["inner"]["peak"]["RssAnon"],
        }
        print(
            f"baseline (python + torch + moegraft import, no work): wall {base['wall']:.1f}s, "
            f"max RSS {gb(base['max_rss'])} GB, RssAnon {gb(base['inner']['peak']['RssAnon'])} GB",
            flush=True,
        )
        for size in [float(s) for s in args.sizes.split(",")]:
            src = work / f"llama-{size:g}gb"
            print(f"\n== generating ~{size:g} GB {args.dtype} Llama at {src}", flush=True)
            info = make_checkpoint(src, size, args.dtype, int(args.src_shard_gb * 1e9))
            print(f"   {info}", flush=True)
            runs: dict[str, list] = {"cp": [], "copytree": [], "convert": []}
            for rep in range(args.reps):
                for kind in ("cp", "convert", "copytree"):
                    r = measure(kind, src, work / f"out-{kind}", work)
                    runs[kind].append(r)
                    extra = ""
                    if "inner" in r:
                        pk = r["inner"]["peak"]
                        extra = (
                            f" RssAnon {gb(pk['RssAnon'])} GB, RssFile {gb(pk['RssFile'])} GB,"
                            f" inner {r['inner']['seconds_inner']:.1f}s"
                        )
                    print(
                        f"   rep {rep} {kind:8s} wall {r['wall']:6.1f}s cpu {r['cpu']:6.1f}s  max RSS {gb(r['max_rss'])} GB"
                        f"  out {gb(r['out_bytes'])} GB{extra}",
                        flush=True,
                    )
            results["sizes"].append(
                {"target_gb": size, "source": info, "runs": runs, "summary": summarise(info, runs)}
            )
            if not args.keep:
                shutil.rmtree(src)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwrote {args.out}")


def summarise(info: dict, runs: dict) -> dict:
    def best(kind, key="wall"):
        return min(r[key] for r in runs[kind])

    conv = runs["convert"]
    in_b, out_b = info["bytes"], conv[0]["out_bytes"]
    c, cp, ct = best("convert"), best("cp"), best("copytree")
    return {
        "in_bytes": in_b,
        "out_bytes": out_b,
        "out_over_in": out_b / in_b,
        "convert_s": c,
        "cp_s": cp,
        "copytree_s": ct,
        "convert_over_cp": c / cp,
        "convert_over_copytree": c / ct,
        # CPU seconds (user+sys) are less sensitive than wall time to other jobs on a shared machine
        "convert_cpu_s": best("convert", "cpu"),
        "cp_cpu_s": best("cp", "cpu"),
        # seconds per GB moved (read + written): conversion moves in+out bytes, a copy moves 2x in
        "convert_s_per_gb_moved": c / ((in_b + out_b) / 1e9),
        "cp_s_per_gb_moved": cp / (2 * in_b / 1e9),
        "per_byte_ratio_vs_cp": (c / (in_b + out_b)) / (cp / (2 * in_b)),
        "convert_max_rss": max(r["max_rss"] for r in conv),
        "convert_peak_rss_anon": max(r["inner"]["peak"]["RssAnon"] for r in conv),
        "convert_peak_rss_file": max(r["inner"]["peak"]["RssFile"] for r in conv),
        "cp_max_rss": max(r["max_rss"] for r in runs["cp"]),
        "copytree_max_rss": max(r["max_rss"] for r in runs["copytree"]),
        "convert_walls": [round(r["wall"], 2) for r in conv],
        "cp_walls": [round(r["wall"], 2) for r in runs["cp"]],
        "copytree_walls": [round(r["wall"], 2) for r in runs["copytree"]],
    }


def print_table(results: dict) -> None:
    cols = [
        "source",
        "layers",
        "in GB",
        "out GB",
        "out/in",
        "convert s",
        "cp s",
        "copytree s",
        "conv/cp",
        "conv/copytree",
        "cpu s conv|cp",
        "s/GB moved conv|cp",
        "per-byte ratio",
        "max RSS GB",
        "RssAnon GB",
        "RssFile GB",
    ]
    rows = []
    for s in results["sizes"]:
        m = s["summary"]
        rows.append(
            [
                f"~{s['target_gb']:g} GB {s['source']['dtype']}",
                str(s["source"]["layers"]),
                gb(m["in_bytes"]),
                gb(m["out_bytes"]),
                f"{m['out_over_in']:.2f}",
                f"{m['convert_s']:.1f}",
                f"{m['cp_s']:.1f}",
                f"{m['copytree_s']:.1f}",
                f"{m['convert_over_cp']:.2f}",
                f"{m['convert_over_copytree']:.2f}",
                f"{m.get('convert_cpu_s', float('nan')):.1f}|{m.get('cp_cpu_s', float('nan')):.1f}",
                f"{m['convert_s_per_gb_moved']:.2f}|{m['cp_s_per_gb_moved']:.2f}",
                f"{m['per_byte_ratio_vs_cp']:.2f}",
                gb(m["convert_max_rss"]),
                gb(m["convert_peak_rss_anon"]),
                gb(m["convert_peak_rss_file"]),
            ]
        )
    w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("\n" + " | ".join(c.ljust(w[i]) for i, c in enumerate(cols)))
    print("-|-".join("-" * x for x in w))
    for r in rows:
        print(" | ".join(v.ljust(w[i]) for i, v in enumerate(r)))
    print(
        "(walls: best of reps; max RSS from /usr/bin/time -v; RssAnon/RssFile: peak from a 20 ms /proc sampler)"
    )


if __name__ == "__main__":
    main()
