// Whether the tiled small-M GEMV (lora_gemv_tiled.cuh, sm_90 form: a warp's next 2 KB of weight in a shared-memory
// slot by one bulk copy) pays up to 16 rows of x: two n8 tiles of x's rows a mma step from the same decoded A
// fragments. The library's GEMV takes up to 8 rows and the tensor-core GEMM 9 to 16; this times a 16-row form with the
// library's x·Aᵀ (lora_down_mma beside) and split-K epilogue, its plan chosen as the library's (the most warps in
// flight, then the most SMs busy) within shared memory for its rows of x, against the library's GEMV at M = 8 in the
// same program. Timed as the benchmarks time (256 MB written before each run); error against an fp64 reference on
// sampled rows. NF4 with double quantization, blocksize 64, bf16, r = 16, s = 2.
//
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -diag-suppress 177 -I csrc/include -I tools \
//     tools/tiled_gemv_16.cu -o /tmp/tiled_gemv_16 && /tmp/tiled_gemv_16 2 8192,28672,16 28672,8192,16
//
// Arguments: rounds, then shapes "N,K,M" (M up to 16). Prints the plan, µs a round, the error and y's hash.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "qlora/l2_policy.h"
#include "qlora/lora_gemv_tiled.cuh"
#include "qlora/mbarrier.cuh"
#include "flushed_timing.cuh"
#include "tiled_lora_case.cuh"
#include "tool_host.cuh"

using namespace qlora;
using bf16 = __nv_bfloat16;

constexpr int kMaxRows = 16;

// d0 += rows 0-7 of x's block, d1 += rows 8-15, both from the same A fragments (see tiled_block_mma).
__device__ __forceinline__ void tiled_block_mma2(float (&d0)[4], float (&d1)[4], uint32_t table, uint2 row_g,
                                                 uint2 row_g8, const uint32_t* x0, const uint32_t* x1,
                                                 uint32_t lane4) {
  uint32_t xr[8], xs[8];
  load_tiled_x_block(xr, x0, true);
  load_tiled_x_block(xs, x1, true);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    uint32_t a[4];
    tiled_a_step(a, row_g, row_g8, s, [&](uint32_t lo, uint32_t hi, int byte) {
      return tiled_pair(table, lo, hi, byte, lane4);
    });
    const uint32_t b[2] = {xr[2 * s], xr[2 * s + 1]};
    const uint32_t c[2] = {xs[2 * s], xs[2 * s + 1]};
    MmaType<bf16>::mma(d0, a, b);
    MmaType<bf16>::mma(d1, a, c);
  }
}

__global__ void __launch_bounds__(kTiledGemvMaxWarps * 32, 1) gemv16_kernel(const LoraLinearParams<bf16> p) {
  using T = bf16;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, threads = blockDim.x, warps = threads / 32;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  uint32_t* table = reinterpret_cast<uint32_t*>(smem);
  float* code2 = reinterpret_cast<float*>(smem + kLanePairTableBytes);
  uint32_t* xs = reinterpret_cast<uint32_t*>(smem + tiled_x_offset(warps));
  const int64_t split_k = p.K / gridDim.y, k_begin = blockIdx.y * split_k;
  const int64_t x_words = tiled_x_words(split_k);
  float* xa_s = reinterpret_cast<float*>(xs + p.M * x_words);
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * warps + warp;
  const bool has_tile = tile < p.N / kTileOrderRows;
  const int64_t blocks_per_row = p.K / kTileOrderK, b_begin = k_begin / kTileOrderK;
  const int groups = static_cast<int>(split_k / kTiledGemvGroupK);
  const uint8_t* w_tile = p.packed + (tile * blocks_per_row + b_begin) * kTileOrderBytes;
  const TiledSlot slot(smem, warp, w_tile);
  if (has_tile && lane == 0) slot.start();
  const float lane_value = lane_code_value<QuantType::NF4>();
  const float code2_value = tid < 256 ? p.scales.code2[tid] : 0.0f;
  const float mean = *p.scales.offset;
  stage_tiled_x(p.x, p.M, p.K, k_begin, split_k, xs, tid, threads);
  fill_lane_pair_table<T>(table, [&](int code) { return __shfl_sync(0xffffffffu, lane_value, code); }, tid, threads);
  if (tid < 256) code2[tid] = code2_value;
  for (int i = tid + threads; i < 256; i += threads) code2[i] = p.scales.code2[i];
  __syncthreads();

  float acc[2][2][2] = {};  // [x tile][row g, g + 8][x rows 2t, 2t + 1 of the tile]
  if (has_tile) {
    const int64_t row_block[2] = {(tile * kTileOrderRows + g) * blocks_per_row + b_begin,
                                  (tile * kTileOrderRows + g + 8) * blocks_per_row + b_begin};
    const uint32_t table_base = static_cast<uint32_t>(__cvta_generic_to_shared(table));
    const uint32_t lane4 = lane * 4;
    const int64_t m0 = g < p.M ? g : p.M - 1, m1 = 8 + g < p.M ? 8 + g : p.M - 1;
    const uint32_t* x_row0 = xs + m0 * x_words + 8 * t;
    const uint32_t* x_row1 = xs + m1 * x_words + 8 * t;
    TiledScales<true> next;
    load_tiled_scales(next, p.scales, row_block, 0);
#pragma unroll 1
    for (int group = 0; group < groups; ++group) {
      uint4 w[kTiledGemvGroupBlocks];
      slot.take(group, groups, lane, w);
      const TiledScales<true> sc = next;
      if (group + 1 < groups) load_tiled_scales(next, p.scales, row_block, group + 1);
#pragma unroll
      for (int j = 0; j < kTiledGemvGroupBlocks; ++j) {
        float d0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const int64_t at = (kTiledGemvGroupBlocks * group + j) * 32;
        tiled_block_mma2(d0, d1, table_base, make_uint2(w[j].x, w[j].y), make_uint2(w[j].z, w[j].w), x_row0 + at,
                         x_row1 + at, lane4);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float scale = mul_then_add(code2[(sc.q[h] >> (8 * j)) & 255], sc.a2[h], mean);
          acc[0][h][0] = fmaf(scale, d0[2 * h], acc[0][h][0]);
          acc[0][h][1] = fmaf(scale, d0[2 * h + 1], acc[0][h][1]);
          acc[1][h][0] = fmaf(scale, d1[2 * h], acc[1][h][0]);
          acc[1][h][1] = fmaf(scale, d1[2 * h + 1], acc[1][h][1]);
        }
      }
    }
  }
  allow_dependent_launch();
  const bool fused_epilogue = p.partial == nullptr;
  if (fused_epilogue && p.lora_B != nullptr) {
    wait_for_prior_grid();
    stage_lora_rows(p, xa_s, 0, static_cast<int>(p.M));
    __syncthreads();
  }
  if (has_tile)
#pragma unroll
    for (int x = 0; x < 2; ++x) store_tiled_sums(p, acc[x], xa_s, tile, g, 8 * x + 2 * t);
  wait_for_prior_grid();
}

cudaError_t launch16(LoraLinearParams<bf16> p, const TiledGemvPlan& plan, const bf16* lora_A, float* scratch, bf16* xa,
                     int num_sms) {
  p.warp_splits = 1;
  p.xa = xa;
  place_gemv_scratch(p, scratch, 0, plan.splits);
  const bool overlap = dependent_launch_supported();
  cudaError_t err = launch_lora_down_mma(p.x, lora_A, xa, p.M, p.K, p.r, 0);
  if (err == cudaSuccess) err = opt_in_dynamic_smem<gemv16_kernel>(kTiledGemvMaxSmem);
  if (err == cudaSuccess)
    err = launch_maybe_dependent(gemv16_kernel, plan.grid, dim3(plan.warps * 32), plan.smem, 0, overlap, p);
  if (err != cudaSuccess || plan.splits == 1) return err;
  return launch_lora_epilogue(p, plan.splits, num_sms, overlap, 0);
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  if (argc < 3) {
    printf("usage: %s rounds N,K,M...\n", argv[0]);
    return 1;
  }
  const int sms = sm_count_or_complain(argv[0]);
  if (sms == 0) return 1;
  char* flush = nullptr;
  cudaMalloc(&flush, kFlushBytes);
  const int rounds = atoi(argv[1]);
  const int r = 16;
  const float s = 2.0f;
  for (int a = 2; a < argc; ++a) {
    long long N, K, M;
    if (!parse_gemm_shape(argv[a], &N, &K, &M) || M > kMaxRows) return 1;
    TiledGemvPlan plan16, plan8;
    const bool lib8 = plan_lora_gemv_tiled(std::min<long long>(M, 8), N, K, r, kTileOrderK, true, sms, &plan8) == nullptr;
    if (!choose_tiled_gemv_launch(M, N, K, r, true, sms, &plan16) || !lib8) {
      printf("%s: no plan\n", argv[a]);
      continue;
    }
    const TiledLoraCase c = tiled_lora_case(N, K, M, r, s);
    const LoraLinearParams<bf16>& p = c.p;
    const bf16* A = c.A;
    float* scratch;
    cudaMalloc(&scratch, std::max<int64_t>({plan16.scratch_floats, plan8.scratch_floats, 1}) * 4);
    bf16* xa;
    cudaMalloc(&xa, M * r * 2);
    std::vector<float> t16, t8;
    for (int round = 0; round < rounds; ++round) {
      LoraLinearParams<bf16> p8 = p;
      p8.M = std::min<long long>(M, 8);
      t8.push_back(flushed_median_us(flush, [&] {
        launch_lora_gemv_tiled<bf16>(p8, plan8, nullptr, A, scratch, xa, QuantType::NF4, sms, 0);
      }, 60, 10));
      t16.push_back(flushed_median_us(flush, [&] { launch16(p, plan16, A, scratch, xa, sms); }, 60, 10));
    }
    cudaMemset(p.y, 0, N * M * 2);
    if (const cudaError_t err = launch16(p, plan16, A, scratch, xa, sms); err != cudaSuccess ||
                                                                           cudaDeviceSynchronize() != cudaSuccess) {
      printf("%s: %s\n", argv[a], cudaGetErrorString(cudaGetLastError()));
      return 1;
    }
    const std::vector<uint16_t> hy = host_copy(p.y, N * M);
    const double err = lora_reference_error(c.w, c.A_host, c.B_host, r, s, N, K, M, hy, 128);
    printf("%6lldx%-6lld M=%-2lld %2d warps x %3u CTAs, %2d splits:", N, K, M, plan16.warps,
           plan16.grid.x * plan16.grid.y, plan16.splits);
    for (float v : t16) printf(" %6.1f", v);
    printf(" us | library at M = %lld (%d splits):", std::min<long long>(M, 8), plan8.splits);
    for (float v : t8) printf(" %6.1f", v);
    printf(" us | err %.2e  y %016llx\n", err, static_cast<unsigned long long>(bits_hash(hy)));
    c.weight.release();
  }
  return 0;
}
