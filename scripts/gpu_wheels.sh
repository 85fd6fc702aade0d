#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.py on a lent GPU machine (the `device` tool), which cannot download anything.
# Its image has PyTorch, accelerate, typer, rich, safetensors, numpy, pandas, pyarrow, ... and transformers 5.17
# with huggingface_hub 1.33 (as last read), but not pydantic, datasets or gguf, which moegraft imports. Those
# travel as wheels in .whl/ (git-ignored), at the versions installed here, built for the device's Python; so do
# transformers and what its version needs over the image's (huggingface_hub 2.x and its HTTP stack, kernels,
# peft), so that the GPU runs the transformers CI tests, the one whose hub-kernel default issue 26 is about.
#   bash scripts/gpu_wheels.sh [--image-transformers] [PYTHON_VERSION]
#     --image-transformers  carry only what the image lacks and run on its own transformers (~4 MB, not ~27 MB)
#     PYTHON_VERSION        default 3.12, the device image's Python (3.11 to try it on this machine)
# Then, in one device call with carry [".whl"]: bash scripts/gpu_check_device.sh
# Checked here by running that script with --tiny in Python 3.11 virtualenvs holding the image's packages
# (transformers 5.17, huggingface_hub 1.33, no pydantic/datasets/gguf), with torch 2.13+cpu and with the image's
# torch 2.11.0+cu130 (on the CPU), carrying 3.11 wheels: 11 of 11 stages ok, both ways, with either torch.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY_TRANSFORMERS=1
if [ "${1:-}" = "--image-transformers" ]; then
  CARRY_TRANSFORMERS=0
  shift
fi
PYVER=${1:-3.12}
# moegraft's requirements the image lacks, and theirs (typing-extensions: pydantic needs a recent one)
NAMES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions gguf datasets dill multiprocess)
if [ "$CARRY_TRANSFORMERS" = 1 ]; then
  # transformers 5.25's requirements above the image's versions, and theirs
  NAMES+=(transformers huggingface_hub hf-xet httpx2 httpcore2 h11 truststore idna click kernels tomlkit regex peft)
fi
rm -rf .whl
mkdir -p .whl
for name in "${NAMES[@]}"; do
  version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl "$name==$version"
done
ls .whl
du -sh .whl
