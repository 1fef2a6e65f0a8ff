#!/usr/bin/env bash
# Sets up a virtual environment (.venv), builds qlora from source and runs every test: the C++
# dispatcher test (ctest) and the Python suite (pytest). CUDA kernels are compiled whenever torch has
# CUDA and nvcc is found; CUDA tests run only where a GPU is present and skip cleanly elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
QLORA_EXTRA_PACKAGES="pytest" . tools/setup_env.sh
ctest --test-dir build/cmake --output-on-failure
# The standalone GPU programs in tools/ (probes and kernel A/B harnesses) are not part of the library; where nvcc
# exists they must still compile against the kernels' headers.
if command -v nvcc > /dev/null; then
  mkdir -p build/tools
  ls tools/*.cu | xargs -P 2 -I{} sh -c 'nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -I csrc/include \
    -I tools -diag-suppress 177 {} -o build/tools/$(basename {} .cu) > build/tools/$(basename {} .cu).log 2>&1 \
    || { cat build/tools/$(basename {} .cu).log; echo "{} does not compile"; exit 255; }'
fi
python -m pytest -q tests
