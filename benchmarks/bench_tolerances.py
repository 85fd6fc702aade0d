"""How much of each float bound the tests use: runs the `tolerance`-marked tests under several thread counts and
fixture seeds, and prints, per bound, the largest value seen against the bound (tests/tolerance.py records them).

    python benchmarks/bench_tolerances.py                        # threads 1 and default x seeds 0 and 1
    python benchmarks/bench_tolerances.py --threads 1 --seeds 0  # one setting
    python benchmarks/bench_tolerances.py -k gemma4              # a subset (pytest's -k)
    python benchmarks/bench_tolerances.py -k gemma4 --update     # ... replacing those tests' rows in the JSON

A bound should sit at least 5x above everything seen (`share` <= 0.2); rows above that are flagged. Writes
benchmarks/results/tolerances.json: {"settings": [{"threads", "seed", "exit_code", "failed", "seconds"}],
"rows": [{"test", "what", "bound", "max_value", "share", "by_setting": {"t1-s0": value, ...}}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 5.0  # a bound is at least this many times the largest value seen


def run_setting(threads: int | None, seed: int, k: str | None, log: Path) -> dict:
    env = {**os.environ, "MOEGRAFT_TEST_SEED": str(seed), "MOEGRAFT_TOLERANCE_LOG": str(log)}
    if threads is not None:
        # torch reads OMP_NUM_THREADS at start, and the CLI subprocesses the tests start inherit it
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "tolerance", "-p", "no:cacheprovider", "-rf"]
    if k:
        cmd += ["-k", k]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", r.stdout, flags=re.M)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    print(
        f"threads {threads or 'default'}, seed {seed}: {tail} ({time.perf_counter() - t0:.0f} s)", flush=True
    )
    return {
        "threads": threads or "default",
        "seed": seed,
        "exit_code": r.returncode,
        "failed": failed,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def aggregate(records: list[dict]) -> list[dict]:
    rows: dict[tuple[str, str], dict] = {}
    for rec in records:
        key = (rec["test"], rec["what"])
        row = rows.setdefault(
            key, {"test": rec["test"], "what": rec["what"], "bound": rec["bound"], "by_setting": {}}
        )
        # a bound that depends on the run (bf16's is a multiple of eager's error) keeps its tightest value
        row["bound"] = min(row["bound"], rec["bound"])
        seen = row["by_setting"].get(rec["setting"], 0.0)
        row["by_setting"][rec["setting"]] = max(seen, rec["value"])
        row["share"] = max(
            row.get("share", 0.0), rec["value"] / rec["bound"] if rec["bound"] else float("inf")
        )
    for row in rows.values():
        row["max_value"] = max(row["by_setting"].values())
    return sorted(rows.values(), key=lambda r: -r["share"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--threads", type=int, nargs="*", default=[1, 0], help="thread counts; 0 = torch's default"
    )
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tolerances.json")
    ap.add_argument("--update", action="store_true", help="keep --out's rows of the tests not run now")
    args = ap.parse_args()

    settings, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for threads in args.threads:
                name = f"t{threads or 'default'}-s{seed}"
                log = Path(tmp) / f"{name}.jsonl"
                settings.append(run_setting(threads or None, seed, args.k, log))
                if log.exists():
                    for line in log.read_text().splitlines():
                        records.append({**json.loads(line), "setting": name})
    rows = aggregate(records)
    if args.update and args.out.exists():
        # a subset rerun (after a bound changed): the other tests' rows and settings stay as measured
        old = json.loads(args.out.read_text())
        ran = {r["test"] for r in rows}
        rows = sorted(rows + [r for r in old["rows"] if r["test"] not in ran], key=lambda r: -r["share"])
        settings = old["settings"] + [{**s, "k": args.k} for s in settings]

    names = sorted({s for r in rows for s in r["by_setting"]})
    print(
        f"\n{'share':>7}  {'bound':>9}  {'max seen':>9}  " + "  ".join(f"{n:>11}" for n in names) + "  check"
    )
    for r in rows:
        flag = "  <-- under 5x" if r["share"] > 1 / MARGIN else ""
        cells = "  ".join(f"{r['by_setting'].get(n, float('nan')):11.3g}" for n in names)
        print(
            f"{r['share']:7.3f}  {r['bound']:9.3g}  {r['max_value']:9.3g}  {cells}  {r['test']}: {r['what']}{flag}"
        )
    under = [r for r in rows if r["share"] > 1 / MARGIN]
    print(
        f"\n{len(rows)} bounds, {len(under)} under a {MARGIN:g}x margin; settings: "
        + ", ".join(f"{s['threads']}/{s['seed']}: exit {s['exit_code']}" for s in settings)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"margin": MARGIN, "settings": settings, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
