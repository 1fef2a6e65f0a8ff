// The small-M op (lora_down, the fused GEMV, the split-K epilogue) as the library plans and launches it, timed as
// the benchmarks time (256 MB written before each run), with its error against an fp64 reference on sampled rows.
// NF4 with double quantization, blocksize 64, bf16, LoRA of rank r (0: none) with s = 2.
//
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -I csrc/include -I tools tools/small_m_op.cu \
//     -o /tmp/small_m_op && /tmp/small_m_op 16 8192,28672,1 28672,8192,1 4096,4096,8
//
// Arguments: [--tiled] r, then shapes "N,K,M". Prints µs, the plan's grid (x: row-tile groups, y: K splits), the
// error as max |y - ref| / max |ref| and a hash of y, so that two builds can be compared bit for bit. --tiled: the
// weight in tile order and the tiled GEMV (lora_gemv_tiled.cuh) as the library plans it, instead of the fused kernel.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "qlora/lora_gemv_tiled.cuh"
#include "qlora/lora_linear_4bit.cuh"
#include "flushed_timing.cuh"
#include "tool_host.cuh"

using namespace qlora;
using bf16 = __nv_bfloat16;

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const bool tiled = argc > 1 && std::string(argv[1]) == "--tiled";
  if (tiled) {
    --argc;
    ++argv;
  }
  if (argc < 3) {
    printf("usage: %s [--tiled] r N,K,M...\n", argv[0]);
    return 1;
  }
  const int sms = sm_count_or_complain(argv[0]);
  if (sms == 0) return 1;
  char* flush = nullptr;
  cudaMalloc(&flush, kFlushBytes);
  const int r = atoi(argv[1]);
  const float s = 2.0f;
  for (int a = 2; a < argc; ++a) {
    long long N, K, M;
    if (!parse_gemm_shape(argv[a], &N, &K, &M)) return 1;
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
    const DqWeightSample w = dq_weight_sample(N, K, M, rng);
    const std::vector<uint16_t> hA = bf16_values(std::max<long long>(r, 1) * K, [&] { return 0.02f * unit(rng); });
    const std::vector<uint16_t> hB = bf16_values(N * std::max(r, 1), [&] { return 0.02f * unit(rng); });
    uint8_t* packed = device_copy(tiled ? to_tile_order(w.packed, N, K) : w.packed);
    uint8_t* q = device_copy(w.qabsmax);
    float* a2 = device_copy(w.absmax2);
    float* code2 = device_copy(w.code2);
    float* offset = device_copy(std::vector<float>{w.offset});
    bf16* x = reinterpret_cast<bf16*>(device_copy(w.x));
    bf16* A = reinterpret_cast<bf16*>(device_copy(hA));
    bf16* B = reinterpret_cast<bf16*>(device_copy(hB));
    bf16* y;
    cudaMalloc(&y, N * M * 2);
    LoraLinearPlan plan;
    TiledGemvPlan tiled_plan;
    if (tiled) {
      if (const char* why = plan_lora_gemv_tiled(M, N, K, r, kTileOrderK, true, sms, &tiled_plan)) {
        printf("%s: %s\n", argv[a], why);
        return 1;
      }
    } else if (plan_lora_linear_4bit<bf16>(M, N, K, r, 6, QuantType::NF4, sms, true, &plan) != cudaSuccess) {
      printf("%s: no plan\n", argv[a]);
      return 1;
    }
    float* scratch;
    cudaMalloc(&scratch, std::max<int64_t>(tiled ? tiled_plan.scratch_floats : plan.scratch_floats, 1) * 4);
    bf16* xa_rows;
    cudaMalloc(&xa_rows, M * std::max(r, 1) * 2);
    LoraLinearParams<bf16> p{};
    p.x = x;
    p.packed = packed;
    p.scales.qabsmax = q;
    p.scales.absmax2 = a2;
    p.scales.code2 = code2;
    p.scales.offset = offset;
    p.lora_B = r > 0 ? B : nullptr;
    p.r = r;
    p.scale = s;
    p.y = y;
    p.M = M;
    p.N = N;
    p.K = K;
    p.log2_blocksize = 6;
    auto launch = [&] {
      const cudaError_t err =
          tiled ? launch_lora_gemv_tiled<bf16>(p, tiled_plan, nullptr, r > 0 ? A : nullptr, scratch, xa_rows,
                                               QuantType::NF4, sms, 0)
                : launch_lora_linear_4bit<bf16>(p, plan, nullptr, r > 0 ? A : nullptr, scratch, QuantType::NF4, sms, 0);
      if (err != cudaSuccess) {
        printf("launch: %s\n", cudaGetErrorString(err));
        exit(1);
      }
    };
    launch();
    if (cudaDeviceSynchronize() != cudaSuccess) {
      printf("%s: %s\n", argv[a], cudaGetErrorString(cudaGetLastError()));
      return 1;
    }
    const std::vector<uint16_t> hy = host_copy(y, N * M);
    const float us = flushed_median_us(flush, launch, 60, 10);
    const double err = lora_reference_error(w, hA, hB, r, s, N, K, M, hy, 256);  // fp64 on 256 sampled rows
    const dim3 grid = tiled ? tiled_plan.grid : plan.grid;
    const char* x_source = tiled                                 ? "tiled"
                           : !plan.block_scaled                   ? "general"
                           : plan.x_source == XSource::Split   ? "Split"
                           : plan.x_source == XSource::Ring    ? "Ring"
                                                               : "Global";
    printf("%6lldx%-6lld M=%-3lld r=%-3d %7.1f us  %5.0f GB/s  grid %ux%ux%u  x %s, %d %s  err %.2e  y %016llx\n",
           N, K, M, r, us, (N * K / 2.0 + N * K / 64.0) / us / 1e3, grid.x, grid.y, grid.z, x_source,
           tiled ? tiled_plan.warps : plan.warp_splits, tiled ? "warps a CTA" : "warp split(s)", err,
           static_cast<unsigned long long>(bits_hash(hy)));
    cudaFree(packed); cudaFree(q); cudaFree(a2); cudaFree(code2); cudaFree(offset); cudaFree(x); cudaFree(A);
    cudaFree(B); cudaFree(y); cudaFree(scratch); cudaFree(xa_rows);
  }
  return 0;
}
