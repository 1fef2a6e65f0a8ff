// xa = x_lora·Aᵀ ([M, r], bfloat16, fp32 sums rounded once) for the tensor-core GEMM's LoRA term, on a few SMs beside
// the GEMM. Torch-free.
//
// The GEMM (gemm_4bit.cuh) reads xa only in its epilogue and is launched as a programmatic dependent of the launch
// before it. This kernel allows that launch at its start, so the GEMM's CTAs take the SMs its few CTAs leave free (a
// one-wave GEMM leaves 4 of 132 idle at M = 256 on 8192×28672, 8192² and 4096²) instead of waiting behind a cuBLAS
// call for x·Aᵀ (5.5-9 µs at M = 256 on the H200, bench/NOTES.md). Its 4 CTAs take 14.6 µs at M = 256, K = 4096 and
// 71 µs at K = 28672, under the GEMM's 27 and 186 µs; with them the GEMM took 0.2-1.8 µs longer than with xa ready
// (tools/xa_beside_gemm.cu). A GEMM in clusters of two needs its CTAs in clusters of two as well (launch_as).
//
// mma.sync m16n8k16 with x's rows as the A operand and A's rows as the B operand: a dot product sums over k in any
// order, so a lane loads 8 consecutive k of its row in one 16-byte load and the fragments' k slots are assigned to
// match. Lane (g, c) of a 32-k chunk loads x[m0 + g][8c .. 8c + 7] and x[m0 + g + 8][same], and for LoRA rows
// 8j + g the same 8 k of A; mma step s of the chunk takes k = 8c + 4s + {0, 1} for the fragment slots {2c, 2c + 1}
// and 8c + 4s + {2, 3} for {2c + 8, 2c + 9}, in x's fragment and A's alike.
//
// A CTA takes token tiles of 16 rows, up to kTilesPerRound at a time: as many as spread the tiles over the CTAs (one
// a CTA up to M = 64). The warps share a round's tiles, kWarps / tiles warps a tile (4 in a full round, all 16 on a
// single tile: at M <= 16 four warps of one SM had taken longer than the GEMM beside them at K = 28672), each a
// contiguous range of its 32-k chunks, and their partial sums are added in split order through shared memory, so
// every xa value has one fixed order of sums for its M.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "qlora/launch.cuh"
#include "qlora/pairs.cuh"

namespace qlora {
namespace lora_down_mma {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kTilesPerRound = 4;
constexpr int kMaxRank = 64;
constexpr int kCtas = 4;  // the SMs a one-wave GEMM of 128 CTAs leaves idle on 132

// Chunks loaded before the first is used, as registers allow: (2 + NT) 16-byte loads a chunk.
template <int NT>
constexpr int unroll() { return NT <= 2 ? 4 : NT <= 4 ? 2 : 1; }

// r <= 8 * NT.
template <int NT>
constexpr int smem_bytes() { return kWarps * 16 * 8 * NT * 4; }

__device__ __forceinline__ uint4 load16_or_zero(const __nv_bfloat16* p, bool ok) {
  return ok ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// x: [M, K] rows contiguous, A: [r, K], xa: [M, r]; K % 32 == 0, x and A 16-byte aligned.
template <int NT>
__global__ void __launch_bounds__(kThreads, 1) lora_down_mma_kernel(const __nv_bfloat16* __restrict__ x,
                                                                    const __nv_bfloat16* __restrict__ A,
                                                                    __nv_bfloat16* __restrict__ xa, int64_t M,
                                                                    int64_t K, int r) {
  allow_dependent_launch();
  constexpr int U = unroll<NT>();
  extern __shared__ float partial[];  // [warp][16 rows][8 * NT columns]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t tiles = (M + 15) / 16, chunks = K / 32;
  const int64_t spread = (tiles + gridDim.x - 1) / gridDim.x;
  const int per_round = static_cast<int>(spread < kTilesPerRound ? spread : kTilesPerRound);
  for (int64_t round = static_cast<int64_t>(blockIdx.x) * per_round; round < tiles;
       round += static_cast<int64_t>(gridDim.x) * per_round) {
    const int tiles_here = static_cast<int>(tiles - round < per_round ? tiles - round : per_round);
    const int splits = kWarps / tiles_here, slot = warp / splits, split = warp % splits;
    const int64_t chunk_begin = chunks * split / splits;
    const int64_t chunk_end = slot < tiles_here ? chunks * (split + 1) / splits : chunk_begin;  // the rest idle
    const int64_t tile = round + slot;
    const int64_t m0 = tile * 16 + g, m1 = m0 + 8;
    const bool ok0 = m0 < M, ok1 = m1 < M;
    const __nv_bfloat16* x0 = x + (ok0 ? m0 : 0) * K + 8 * c;
    const __nv_bfloat16* x1 = x + (ok1 ? m1 : 0) * K + 8 * c;
    const __nv_bfloat16* a_row[NT];
    bool a_ok[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      a_ok[j] = 8 * j + g < r;
      a_row[j] = A + (a_ok[j] ? 8 * j + g : 0) * K + 8 * c;
    }
    float acc[NT][4] = {};
    for (int64_t chunk = chunk_begin; chunk < chunk_end; chunk += U) {
      uint4 xv[U][2], av[U][NT];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool in = chunk + u < chunk_end;
        const int64_t k = (chunk + u) * 32;
        xv[u][0] = load16_or_zero(x0 + k, in && ok0);
        xv[u][1] = load16_or_zero(x1 + k, in && ok1);
#pragma unroll
        for (int j = 0; j < NT; ++j) av[u][j] = load16_or_zero(a_row[j] + k, in && a_ok[j]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const uint32_t a[4] = {word(xv[u][0], 2 * s), word(xv[u][1], 2 * s), word(xv[u][0], 2 * s + 1),
                                 word(xv[u][1], 2 * s + 1)};
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const uint32_t b[2] = {word(av[u][j], 2 * s), word(av[u][j], 2 * s + 1)};
            MmaType<__nv_bfloat16>::mma(acc[j], a, b);
          }
        }
    }
    // d0, d1: row g, columns 2c, 2c + 1 of the n-tile; d2, d3: row g + 8.
    float* mine = partial + warp * 16 * 8 * NT;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) mine[(g + (e >= 2 ? 8 : 0)) * 8 * NT + 8 * j + 2 * c + (e & 1)] = acc[j][e];
    __syncthreads();
    constexpr int kOutputs = kTilesPerRound * 16 * 8 * NT;
    for (int i = threadIdx.x; i < kOutputs; i += kThreads) {
      const int tile_slot = i / (16 * 8 * NT), row = i / (8 * NT) % 16, col = i % (8 * NT);
      const int64_t m = (round + tile_slot) * 16 + row;
      if (tile_slot >= tiles_here || m >= M || col >= r) continue;  // past the round: another CTA's tiles
      float sum = 0.0f;
      for (int sp = 0; sp < splits; ++sp) sum += partial[((tile_slot * splits + sp) * 16 + row) * 8 * NT + col];
      xa[m * r + col] = __float2bfloat16_rn(sum);
    }
    __syncthreads();  // before the next round overwrites the partial sums
  }
}

// cluster > 1: the CTAs in clusters of that many, so that they take whole cluster slots of the SMs (a GEMM launched in
// clusters of two then finds as many pairs of SMs free as their count allows).
template <int NT>
cudaError_t launch_as(const __nv_bfloat16* x, const __nv_bfloat16* A, __nv_bfloat16* xa, int64_t M, int64_t K, int r,
                      cudaStream_t stream, unsigned cluster) {
  constexpr auto kernel = lora_down_mma_kernel<NT>;
  if (smem_bytes<NT>() > 48 * 1024) {
    const cudaError_t err = opt_in_dynamic_smem<kernel>(smem_bytes<NT>());
    if (err != cudaSuccess) return err;
  }
  const int64_t tiles = (M + 15) / 16;
  unsigned ctas = static_cast<unsigned>(tiles < kCtas ? tiles : kCtas);
  ctas = (ctas + cluster - 1) / cluster * cluster;
  return launch_in_clusters(kernel, dim3(ctas), dim3(kThreads), smem_bytes<NT>(), stream, false, dim3(cluster, 1, 1), x,
                            A, xa, M, K, r);
}

}  // namespace lora_down_mma

// Layouts lora_down_mma takes: K a multiple of 32 (the GEMM's K is one of 64) and rank at most 64; x and A 16-byte
// aligned with contiguous rows (the caller's aligned_contiguous).
inline bool lora_down_mma_supported(int64_t K, int64_t r) {
  return K % 32 == 0 && r >= 1 && r <= lora_down_mma::kMaxRank;
}

inline cudaError_t launch_lora_down_mma(const __nv_bfloat16* x, const __nv_bfloat16* A, __nv_bfloat16* xa, int64_t M,
                                        int64_t K, int r, cudaStream_t stream, unsigned cluster = 1) {
  if (M == 0) return cudaSuccess;
  if (!lora_down_mma_supported(K, r)) return cudaErrorInvalidValue;
  if (r <= 16) return lora_down_mma::launch_as<2>(x, A, xa, M, K, r, stream, cluster);
  if (r <= 32) return lora_down_mma::launch_as<4>(x, A, xa, M, K, r, stream, cluster);
  return lora_down_mma::launch_as<8>(x, A, xa, M, K, r, stream, cluster);
}

}  // namespace qlora
