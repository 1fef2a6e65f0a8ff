#!/usr/bin/env bash
# A/B of a kernel change on a standalone GEMM program in tools/: builds PROGRAM from the tree as it is ("B") and
# from the tree with PATCH reversed ("A"), runs them interleaved (A B A B, so that clock drift favours neither) with
# ARGS, and prints each run. PROGRAM defaults to stream_k_gemm (the stream-K form against tiles; one short line a
# case); gemm_forms takes the cases as arguments.
#
#   git diff > /tmp/change.patch                                   # where the repository is
#   tools/ab_gemm.sh /tmp/change.patch                             # on the GPU machine, in a copy of the changed tree
#   tools/ab_gemm.sh /tmp/change.patch gemm_forms --dq 4096,4096,256 8192,28672,32
set -u -o pipefail
patch_file=$(realpath "${1:?usage: tools/ab_gemm.sh PATCH [PROGRAM [ARGS...]]}")
program=${2:-stream_k_gemm}
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/ab_gemm}
mkdir -p "$out"
base=$(mktemp -d) bin=$(mktemp -d)  # the binaries and build logs stay out of OUT
cp -r csrc tools "$base/"
(cd "$base" && patch -s -R -p1 < "$patch_file") || { echo "PATCH does not reverse cleanly on this tree"; exit 1; }
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
flags="-O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -I csrc/include -I tools -diag-suppress 177"
$nvcc $flags "tools/$program.cu" -o "$bin/B" > "$bin/B.build.log" 2>&1 &
(cd "$base" && $nvcc $flags "tools/$program.cu" -o "$bin/A" > "$bin/A.build.log" 2>&1) &
wait
[ -x "$bin/A" ] && [ -x "$bin/B" ] || { echo "build failed:"; tail -20 "$bin"/*.build.log; exit 1; }
status=0
for run in 1 2; do
  for v in A B; do
    "$bin/$v" "$@" > "$out/$v$run.txt" 2>&1 || status=1
  done
done
for f in A1 B1 A2 B2; do
  echo "== $f"
  # stream_k_gemm: "NxK M=m[ +LoRA+bias]: ... tiles a, stream-K b; second run identical; tiles t us, stream-K s us"
  # -> one short line; other programs' lines pass unchanged
  sed -E 's/^([0-9]+x[0-9]+ M=[0-9]+( \+LoRA\+bias)?):.*in units of the allowed error: tiles ([0-9.]+), stream-K ([0-9.]+)([^;]*); second run ([a-zA-Z]+); tiles ([0-9.]+) us, stream-K ([0-9.]+) us/  \1: fp64 \3 \/ \4\5, rerun \6, tiles \7 us, stream-K \8 us/' "$out/$f.txt"
done
rm -rf "$base" "$bin"
exit $status
