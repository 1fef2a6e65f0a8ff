// What dequantize_4bit gains or loses with the work a CTA takes (units of 8 elements a thread: the library takes 4
// from row-major bytes, 8 from tile order) and the number of CTAs an SM holds (capped through __launch_bounds__'
// minimum CTAs an SM; 1: no cap). At 4096x4096 the row-major grid is 2048 CTAs, about 3.1 waves of 5 CTAs an SM.
// Each variant is timed as the benchmarks time (256 MB written before each run, CUDA events, median); every output is
// compared bit for bit with the row-major kernel's.
//
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -I csrc/include -I tools \
//        tools/dequant_occupancy.cu -o /tmp/dequant_occupancy && /tmp/dequant_occupancy [N,K ...]
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "qlora/quantize_4bit.cuh"
#include "flushed_timing.cuh"
#include "tool_host.cuh"

using namespace qlora;
using bf16 = __nv_bfloat16;

namespace {

struct Device {
  DqWeightOnDevice w;
  bf16* out;
  int64_t N, K;
};

template <bool kTile, int kMinCtas, int kUnits>
dim3 grid_of(const Device& d) {
  const int64_t n = d.N * d.K;
  const int64_t per_cta = int64_t{kDequantizeThreads} * kUnits * kDequantizeElems;
  constexpr int blocks = tile_dequantize_blocks(kUnits);
  return kTile ? dim3(static_cast<unsigned>((d.K / kTileOrderK + blocks - 1) / blocks),
                      static_cast<unsigned>(d.N / kTileOrderRows))
               : dim3(static_cast<unsigned>((n + per_cta - 1) / per_cta));
}

template <bool kTile, int kMinCtas, int kUnits = kTile ? kTileDequantizeUnits : kDequantizeUnits>
void launch(const Device& d) {
  const int64_t n = d.N * d.K;
  auto kernel = dequantize_4bit_kernel<bf16, QuantType::NF4, true, kTile, kMinCtas, kUnits>;
  kernel<<<grid_of<kTile, kMinCtas, kUnits>(d), kDequantizeThreads>>>(
      kTile ? d.w.tiled : d.w.packed, nullptr, d.w.qabsmax, d.w.absmax2, d.w.code2, d.w.offset, d.out, n, 6, d.K);
}

template <bool kTile, int kMinCtas, int kUnits = kTile ? kTileDequantizeUnits : kDequantizeUnits>
void report(const Device& d, char* flush, uint64_t reference_hash) {
  auto kernel = dequantize_4bit_kernel<bf16, QuantType::NF4, true, kTile, kMinCtas, kUnits>;
  const KernelRun run = run_against_reference(kernel, kDequantizeThreads, [&] { launch<kTile, kMinCtas, kUnits>(d); },
                                              d.out, d.N * d.K, reference_hash, flush);
  const dim3 grid = grid_of<kTile, kMinCtas, kUnits>(d);
  const double bytes = d.N * d.K * 2.5 + d.N * d.K / 64.0;
  printf("  %-9s %2d units, min CTAs %d: %2d registers, %3d B local, %d CTAs/SM, %6u CTAs  %7.1f us  %5.0f GB/s  %s\n",
         kTile ? "tile" : "row-major", kUnits, kMinCtas, run.registers, run.local_bytes, run.ctas_per_sm,
         grid.x * grid.y, run.us, bytes / run.us / 1e3, run.same ? "same bits" : "DIFFERENT");
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::array<int64_t, 2>> shapes;
  if (!start_weight_tool("dequant_occupancy", argc, argv, &shapes)) return 1;
  char* flush;
  cudaMalloc(&flush, kFlushBytes);
  std::mt19937 rng(7);
  for (const auto& [N, K] : shapes) {
    Device d{dq_weight_on_device(dq_weight_sample(N, K, 1, rng), N, K), nullptr, N, K};
    cudaMalloc(&d.out, N * K * 2);
    launch<false, 1>(d);
    const uint64_t reference = bits_hash(host_copy(d.out, N * K));
    printf("%lldx%lld, NF4 + double quantization, bf16 out\n", static_cast<long long>(N), static_cast<long long>(K));
    report<false, 1>(d, flush, reference);
    report<false, 1, 2>(d, flush, reference);
    report<false, 1, 6>(d, flush, reference);
    report<false, 1, 8>(d, flush, reference);
    report<false, 1, 12>(d, flush, reference);
    report<false, 1, 16>(d, flush, reference);
    report<false, 8, 2>(d, flush, reference);
    report<false, 4, 8>(d, flush, reference);
    report<true, 1>(d, flush, reference);
    report<true, 1, 2>(d, flush, reference);
    report<true, 1, 4>(d, flush, reference);
    report<true, 1, 12>(d, flush, reference);
    report<true, 7, 4>(d, flush, reference);
    d.w.release();
    cudaFree(d.out);
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
  return 0;
}
