#!/usr/bin/env bash
# Builds qlora on a CUDA machine, runs the whole test suite, then the benchmarks; the benchmark table
# is printed last. Logs and results go to $OUT (default gpu_out/).
#
#   tools/gpu_check.sh                    # everything
#   TESTS="tests/test_quantize_4bit.py" BENCH="quantize_4bit" tools/gpu_check.sh
#   FINETUNE=1 QUALITY=1 tools/gpu_check.sh   # also the default `qlora finetune` run and tools/quality_check.py (3 seeds)
#
# Wheels placed in .whl/ (bitsandbytes for the side-by-side comparisons) are installed first, without
# network access. TORCH_CUDA_ARCH_LIST defaults to 9.0a (H100/H200), MAX_JOBS to the core count.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qlora-site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/qlora-site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH=$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import qlora, torch; print('qlora', qlora.__version__, 'archs', qlora._C.cuda_archs(), 'torch', torch.__version__)"
ctest --test-dir build/cmake --output-on-failure 2>&1 | tail -4

timeout ${TEST_TIMEOUT:-900} python3 -m pytest -q -rs -p no:cacheprovider ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -${TEST_TAIL:-25}
tests_rc=$?

if [ "${FINETUNE:-0}" = "1" ]; then
  python3 -m qlora finetune --output /tmp/qlora-finetune-out 2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|step/s" > "$OUT/finetune.log"
  tail -4 "$OUT/finetune.log"
fi
if [ "${QUALITY:-0}" = "1" ]; then
  python3 tools/quality_check.py --seeds 0 1 2 2>&1 | tee "$OUT/quality.log" | grep -E "^(seed|QLoRA) "
fi

if [ "${BENCH:-all}" != "none" ]; then
  only=""
  [ "${BENCH:-all}" != "all" ] && only="--only ${BENCH}"
  timeout ${BENCH_TIMEOUT:-900} python3 -m bench $only --out "$OUT" 2>&1 | tee "$OUT/bench.log" | grep -v "^\[" | tail -${BENCH_TAIL:-40}
fi
exit $tests_rc
