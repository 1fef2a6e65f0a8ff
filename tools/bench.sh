#!/usr/bin/env bash
# Sets up a virtual environment (.venv), builds qlora and runs the microbenchmarks: every kernel against
# PyTorch (and bitsandbytes when it is installed) on the GPU if there is one, else small CPU sizes.
# Results: bench_results/results.json and results.png. Extra arguments go to `python -m bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
QLORA_EXTRA_PACKAGES="matplotlib" . tools/setup_env.sh
python -m bench "$@"
