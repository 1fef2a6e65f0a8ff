#!/usr/bin/env bash
# Sets up a virtual environment (.venv), builds qlora from source and runs every test: the C++
# dispatcher test (ctest) and the Python suite (pytest). CUDA kernels are compiled whenever torch has
# CUDA and nvcc is found; CUDA tests run only where a GPU is present and skip cleanly elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
QLORA_EXTRA_PACKAGES="pytest" . tools/setup_env.sh
ctest --test-dir build/cmake --output-on-failure
python -m pytest -q tests
