#!/usr/bin/env bash
# benchmarks/gpu_check.py on a lent GPU machine, in one call of the `device` tool's `run`, with carry [".whl"]
# (made here first by scripts/gpu_wheels.sh):
#   bash scripts/gpu_check_device.sh [gpu_check.py options, e.g. --stages build_models,convert_carve,...]
# It installs the wheels into /tmp/site (nothing is installed into the image), puts them and src/ first on
# PYTHONPATH, and writes gpu_check.json and gpu_check.log into $OUT (the folder that comes back), or into
# /tmp/gpu_check_out without one. Test it here with: OUT=/tmp/o bash scripts/gpu_check_device.sh --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .whl ] || { echo "no .whl/ here: run scripts/gpu_wheels.sh first and carry .whl" >&2; exit 2; }
SITE=${GPU_CHECK_SITE:-/tmp/site}
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
python3 benchmarks/gpu_check.py --out /tmp/gpu_check --json "$OUT/gpu_check.json" "$@"
