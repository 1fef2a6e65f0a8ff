#!/usr/bin/env bash
# Sets up a virtual environment (.venv), builds qlora from source and runs every test: the C++
# dispatcher test (ctest) and the Python suite (pytest). CUDA kernels are compiled whenever torch has
# CUDA and nvcc is found; CUDA tests run only where a GPU is present and skip cleanly elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" numpy pytest ninja "peft>=0.13" "transformers>=4.45" safetensors accelerate tqdm
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
python -m pip install -q --no-build-isolation -e .
ctest --test-dir build/cmake --output-on-failure
python -m pytest -q tests
