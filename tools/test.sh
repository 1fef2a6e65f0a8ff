#!/usr/bin/env bash
# Sets up a virtual environment (.venv), builds qlora from source and runs every test: the C++
# dispatcher test (ctest) and the Python suite (pytest). CUDA kernels are compiled whenever torch has
# CUDA and nvcc is found; CUDA tests run only where a GPU is present and skip cleanly elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
QLORA_EXTRA_PACKAGES="pytest" . tools/setup_env.sh
ctest --test-dir build/cmake --output-on-failure
# The standalone read-bandwidth probe is not part of the library; where nvcc exists it must still compile.
if command -v nvcc > /dev/null; then nvcc -O3 -std=c++20 -arch=sm_90a tools/read_patterns.cu -o build/read_patterns; fi
python -m pytest -q tests
