// The merging kernel's CTA shape (dequantize_4bit_lora: W + s·B·A written densely) against its time, from row-major
// bytes and from tile order: warps a CTA on adjacent 64-column strips, and 16-row tiles each warp walks (the library
// takes 2 and 6). At 4096x4096, 8 tiles launch 1024 CTAs of two warps where 1584 fit at once (80 registers), 6 tiles
// 1376. Timed as the benchmarks time (256 MB written before
// each run, CUDA events, median of 36); r = 16, s = 2 (the power-of-two form), NF4 + double quantization; every
// output compared bit for bit with 2 warps x 8 tiles' from row-major bytes.
//
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -I csrc/include -I tools \
//        tools/dequant_lora_shapes.cu -o /tmp/dequant_lora_shapes && /tmp/dequant_lora_shapes [N,K ...]
#include <array>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "qlora/dequantize_lora.cuh"
#include "flushed_timing.cuh"
#include "tool_host.cuh"

using namespace qlora;
using bf16 = __nv_bfloat16;

namespace {

constexpr int kRank = 16;

template <bool kTile, int kWarps, int kTiles>
void report(const DequantizeLoraParams<bf16>& p, char* flush, uint64_t reference_hash) {
  using Shape = DequantizeLoraShape<kWarps, kTiles>;
  auto kernel = dequantize_lora_kernel<bf16, QuantType::NF4, true, 1, true, kTile, Shape>;
  auto launch = [&] { launch_dequantize_lora_as<bf16, QuantType::NF4, true, true, kTile, Shape>(p, nullptr); };
  const KernelRun run = run_against_reference(kernel, Shape::threads, launch, p.out, p.N * p.K, reference_hash, flush);
  const int64_t grid = ((p.K / kDequantizeLoraCols + kWarps - 1) / kWarps) * ((p.N + 16 * kTiles - 1) / (16 * kTiles));
  printf("  %-9s %d warps x %2d tiles: %3d registers, %2d CTAs/SM, %6lld CTAs  %7.1f us  %s\n",
         kTile ? "tile" : "row-major", kWarps, kTiles, run.registers, run.ctas_per_sm, static_cast<long long>(grid),
         run.us, run.same ? "same bits" : "DIFFERENT");
}

template <bool kTile>
void sweep(const DequantizeLoraParams<bf16>& p, char* flush, uint64_t reference) {
  report<kTile, 2, 6>(p, flush, reference);
  report<kTile, 2, 8>(p, flush, reference);
  report<kTile, 2, 12>(p, flush, reference);
  report<kTile, 2, 5>(p, flush, reference);
  report<kTile, 2, 4>(p, flush, reference);
  report<kTile, 1, 8>(p, flush, reference);
  report<kTile, 1, 6>(p, flush, reference);
  report<kTile, 2, 16>(p, flush, reference);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::array<int64_t, 2>> shapes;
  if (!start_weight_tool("dequant_lora_shapes", argc, argv, &shapes)) return 1;
  char* flush;
  cudaMalloc(&flush, kFlushBytes);
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  for (const auto& [N, K] : shapes) {
    const DqWeightOnDevice w = dq_weight_on_device(dq_weight_sample(N, K, 1, rng), N, K);
    const uint16_t* lora_A = device_copy(bf16_values(kRank * K, [&] { return unit(rng) * 0.02f; }));
    const uint16_t* lora_B = device_copy(bf16_values(N * kRank, [&] { return unit(rng) * 0.02f; }));
    bf16* out;
    cudaMalloc(&out, N * K * 2);
    DequantizeLoraParams<bf16> p{};
    p.packed = w.packed;
    p.scales.qabsmax = w.qabsmax;
    p.scales.absmax2 = w.absmax2;
    p.scales.code2 = w.code2;
    p.scales.offset = w.offset;
    p.lora_A = reinterpret_cast<const bf16*>(lora_A);
    p.lora_B = reinterpret_cast<const bf16*>(lora_B);
    p.lora_B_pairs = true;
    p.r = kRank;
    p.scale = 2.0f;
    p.out = out;
    p.N = N;
    p.K = K;
    p.log2_blocksize = 6;
    launch_dequantize_lora_as<bf16, QuantType::NF4, true, true, false, DequantizeLoraShape<2, 8>>(p, nullptr);
    const uint64_t reference = bits_hash(host_copy(out, N * K));
    printf("%lldx%lld, NF4 + double quantization, r = %d, s = 2, bf16 out\n", static_cast<long long>(N),
           static_cast<long long>(K), kRank);
    sweep<false>(p, flush, reference);
    p.packed = w.tiled;
    p.tile_order = true;
    sweep<true>(p, flush, reference);
    w.release();
    for (const void* q : {static_cast<const void*>(lora_A), static_cast<const void*>(lora_B),
                          static_cast<const void*>(out)})
      cudaFree(const_cast<void*>(q));
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
  return 0;
}
