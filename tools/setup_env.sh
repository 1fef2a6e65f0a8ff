# Sourced by tools/{test,bench,finetune}.sh: creates and activates .venv, installs torch, the common
# packages and those named in QLORA_EXTRA_PACKAGES, and builds qlora from source in editable mode.
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" numpy ninja "transformers>=4.45" "peft>=0.13" safetensors accelerate tqdm ${QLORA_EXTRA_PACKAGES:-}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
python -m pip install -q --no-build-isolation -e .
