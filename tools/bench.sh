#!/usr/bin/env bash
# Sets up a virtual environment (.venv), builds qlora and runs the microbenchmarks: every kernel against
# PyTorch (and bitsandbytes when it is installed) on the GPU if there is one, else small CPU sizes.
# Results: bench_results/results.json and results.png. Extra arguments go to `python -m bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" numpy ninja matplotlib "transformers>=4.45" "peft>=0.13" safetensors accelerate tqdm
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
python -m pip install -q --no-build-isolation -e .
python -m bench "$@"
