#!/usr/bin/env bash
# Sets up a virtual environment (.venv), builds qlora and runs the main job: `qlora finetune`. Without arguments
# it fine-tunes an embedded tiny Llama on the bundled corpus (no download; about a minute on a CPU), else it
# passes the arguments on, e.g. `bash tools/finetune.sh --model ./my-llama --data train.jsonl --steps 1000`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" numpy ninja "transformers>=4.45" "peft>=0.13" safetensors accelerate tqdm
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
python -m pip install -q --no-build-isolation -e .
qlora finetune "$@"
