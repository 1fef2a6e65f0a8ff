#!/usr/bin/env bash
# Sets up a virtual environment (.venv), builds qlora and runs the main job: `qlora finetune`. Without arguments
# it fine-tunes an embedded tiny Llama on the bundled corpus (no download; about a minute on a CPU), else it
# passes the arguments on, e.g. `bash tools/finetune.sh --model ./my-llama --data train.jsonl --steps 1000`.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/setup_env.sh
qlora finetune "$@"
