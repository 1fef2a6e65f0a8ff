// The small-M GEMV for tile-ordered weights (qlora/tile_order.h), up to 8 rows of x. Torch-free.
//
// Each warp owns one 16-row tile of W over a K split. A lane's 16 bytes of a 64-k block are its mma.sync A fragments
// for the block's four k16 steps, so the tile's bytes for four blocks (a group) are 2 KB in a row. On sm_90 the SM's
// copy engine brings a warp's next group into a 2 KB slot of shared memory (a 1-D bulk copy with an L2 evict_first
// policy, counted on the slot's mbarrier) while the warp decodes the one before, which it has read from the slot with
// four 16-byte shared loads a lane; one group in flight a warp read faster than two or three, and than loads into
// registers (H200, 2026-12-01, tools/tiled_ring_gemv.cu: M = 1 8192x28672 49.5 -> 47.7 µs, 28672x8192 52.4 -> 50.6,
// 8192² 22.6 -> 21.3). Before sm_90 each lane loads its fragments straight into registers, kTiledGemvGroups groups in
// flight a warp. A byte of two codes is one PRMT (its address in a per-lane table of pairs) and one shared load;
// each k16 step lies inside one block, so the block's scale multiplies the step sums once. x of the CTA's K split
// is staged once, each block's pairs in the order of the lanes' B fragments. Rows of x are the mma's n columns, so
// M = 1 to 8 cost about the same (the lanes of columns past M skip x's loads). x·Aᵀ runs beside it (lora_down_mma on
// the SM it leaves free) for bfloat16; with one K split the GEMV adds the LoRA term and bias itself, else
// lora_epilogue_kernel sums the splits.
#pragma once

#include <algorithm>
#include <type_traits>

#include "qlora/l2_policy.h"
#include "qlora/lora_down_mma.cuh"
#include "qlora/lora_linear_4bit.cuh"
#include "qlora/mbarrier.cuh"
#include "qlora/tile_order.h"

namespace qlora {

constexpr int kTiledGemvMaxM = 8;        // one n8 tile of x rows
constexpr int kTiledGemvGroupBlocks = 4;  // 64-k blocks a warp loads at once
constexpr int kTiledGemvGroups = 3;       // groups in flight a warp before sm_90
constexpr int kTiledGemvGroupK = kTiledGemvGroupBlocks * kTileOrderK;  // a K split is whole groups
constexpr int kTiledGemvGroupBytes = kTiledGemvGroupBlocks * kTileOrderBytes;
constexpr int kTiledGemvMaxWarps = 16;
constexpr int kTiledXLoads = 8;           // x's 16-byte loads in flight a thread while it is staged
constexpr int kTiledGemvMaxSplits = 32;
constexpr int kTiledCode2Bytes = 256 * 4;
constexpr int kTiledBarrierBytes = kTiledGemvMaxWarps * 8;  // a slot's mbarrier a warp
constexpr int kTiledGemvMaxSmem = 227 * 1024;  // the most a CTA may opt in to on sm_90
// Words (pairs) of one staged row of x for a K split: 16 bytes more than the split, so that the rows a quarter
// warp reads fall in different banks.
__host__ __device__ inline int64_t tiled_x_words(int64_t split_k) { return split_k / 2 + 4; }
// Shared memory: the pair table, code2, the slots' barriers, a slot a warp, x's rows, then xa's (fused epilogue).
constexpr int kTiledBarrierOffset = kLanePairTableBytes + kTiledCode2Bytes;
constexpr int kTiledSlotOffset = kTiledBarrierOffset + kTiledBarrierBytes;
__host__ __device__ inline int64_t tiled_x_offset(int warps) {
  return kTiledSlotOffset + int64_t{warps} * kTiledGemvGroupBytes;
}
__host__ __device__ inline int64_t tiled_gemv_smem(int64_t M, int64_t split_k, int r, bool fused_epilogue, int warps) {
  return tiled_x_offset(warps) + M * tiled_x_words(split_k) * 4 + (fused_epilogue ? M * r * 4 : 0);
}

__device__ __forceinline__ uint4 load_shared16(uint32_t at) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(at));
  return v;
}

__device__ __forceinline__ uint4 load_streaming16(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Where in the pair table the pair of byte `byte` (0..7) of a lane's 8 bytes {lo, hi} of one block row lies.
__device__ __forceinline__ uint32_t tiled_pair_offset(uint32_t lo, uint32_t hi, int byte, uint32_t lane4) {
  return __byte_perm(byte < 4 ? lo : hi, lane4, 0x5504u | ((byte & 3) << 4));
}
// That pair itself.
__device__ __forceinline__ uint32_t tiled_pair(uint32_t table, uint32_t lo, uint32_t hi, int byte, uint32_t lane4) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(table + tiled_pair_offset(lo, hi, byte, lane4)));
  return v;
}
// a = a lane's A fragments of k16 step s of a block: pair(lo, hi, byte) of bytes 2s and 2s + 1 of rows g and g + 8.
template <typename Pair>
__device__ __forceinline__ void tiled_a_step(uint32_t (&a)[4], uint2 row_g, uint2 row_g8, int s, Pair pair) {
  a[0] = pair(row_g.x, row_g.y, 2 * s);
  a[1] = pair(row_g8.x, row_g8.y, 2 * s);
  a[2] = pair(row_g.x, row_g.y, 2 * s + 1);
  a[3] = pair(row_g8.x, row_g8.y, 2 * s + 1);
}

// A lane's B fragments of one 64-k block for its four k16 steps: the block's 8 words of x at x_block in the lanes'
// order (pair 8s + t + 4e at word 8t + 2s + e, x_block already at the lane's 8t). x_used: whether the lane's B column g
// is a row of x. The other lanes' columns are never stored, so they skip the loads: fewer lanes, fewer shared-memory
// wavefronts (H200, 2026-12-01, tools/tiled_ring_gemv.cu, y the same bit for bit: 8192x28672 M = 1 47.6 -> 44.8 µs,
// M = 4 48.7 -> 46.7; 28672x8192 M = 1 50.5 -> 47.7).
__device__ __forceinline__ void load_tiled_x_block(uint32_t (&xr)[8], const uint32_t* x_block, bool x_used) {
  const uint4* xb = reinterpret_cast<const uint4*>(x_block);
  uint4 x0 = make_uint4(0, 0, 0, 0), x1 = x0;
  if (x_used) {
    x0 = xb[0];
    x1 = xb[1];
  }
  const uint32_t words[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) xr[i] = words[i];
}
// d += one 64-k block's four k16 steps for a lane: A from its 8 code bytes of rows g and g + 8 of the block, B from
// x_block as load_tiled_x_block reads it.
template <typename T>
__device__ __forceinline__ void tiled_block_mma(float (&d)[4], uint32_t table, uint2 row_g, uint2 row_g8,
                                                const uint32_t* x_block, uint32_t lane4, bool x_used) {
  uint32_t xr[8];
  load_tiled_x_block(xr, x_block, x_used);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    uint32_t a[4];
    tiled_a_step(a, row_g, row_g8, s, [&](uint32_t lo, uint32_t hi, int byte) {
      return tiled_pair(table, lo, hi, byte, lane4);
    });
    const uint32_t b[2] = {xr[2 * s], xr[2 * s + 1]};
    MmaType<T>::mma(d, a, b);
  }
}

// The raw scales of a lane's group (four blocks) for both its rows.
template <bool kDoubleQuant>
struct TiledScales {
  uint32_t q[2];  // double quantization: the four blocks' 8-bit codes of each row
  float a2[2];    // and their second-level scale
};
template <>
struct TiledScales<false> {
  float4 absmax[2];
};
// The raw scales of group `group` of a lane's rows g and g + 8, whose split starts at blocks row_block.
template <bool kDoubleQuant>
__device__ __forceinline__ void load_tiled_scales(TiledScales<kDoubleQuant>& sc, const BlockScales& scales,
                                                  const int64_t (&row_block)[2], int group) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t block = row_block[h] + kTiledGemvGroupBlocks * group;
    if constexpr (kDoubleQuant) {
      sc.q[h] = __ldg(reinterpret_cast<const uint32_t*>(scales.qabsmax + block));
      sc.a2[h] = __ldg(scales.absmax2 + block / kAbsmaxBlocksize);
    } else {
      sc.absmax[h] = __ldg(reinterpret_cast<const float4*>(scales.absmax + block));
    }
  }
}

// acc += d, one block's step sums (block j of a lane's group), each row's scaled as dequantize_4bit scales it.
template <bool kDoubleQuant>
__device__ __forceinline__ void add_scaled_block(float (&acc)[2][2], const float (&d)[4],
                                                 const TiledScales<kDoubleQuant>& sc, int j, const float* code2,
                                                 float mean) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float scale;
    if constexpr (kDoubleQuant)
      scale = mul_then_add(code2[(sc.q[h] >> (8 * j)) & 255], sc.a2[h], mean);  // as dequantize_4bit rounds it
    else
      scale = j == 0 ? sc.absmax[h].x : j == 1 ? sc.absmax[h].y : j == 2 ? sc.absmax[h].z : sc.absmax[h].w;
    acc[h][0] = fmaf(scale, d[2 * h], acc[h][0]);
    acc[h][1] = fmaf(scale, d[2 * h + 1], acc[h][1]);
  }
}

// acc[row g, g + 8][x rows 2t, 2t + 1] += a lane's group: its four blocks' bytes w, their scales, x's staged pairs
// from x_group (the lane's words of the group's first block; x_used as tiled_block_mma's); code2 and mean as
// dequantize_4bit applies them.
template <typename T, bool kDoubleQuant>
__device__ __forceinline__ void decode_tiled_group(float (&acc)[2][2], uint32_t table, const uint4 (&w)[kTiledGemvGroupBlocks],
                                                   const TiledScales<kDoubleQuant>& sc, const uint32_t* x_group,
                                                   bool x_used, uint32_t lane4, const float* code2, float mean) {
#pragma unroll
  for (int j = 0; j < kTiledGemvGroupBlocks; ++j) {
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    tiled_block_mma<T>(d, table, make_uint2(w[j].x, w[j].y), make_uint2(w[j].z, w[j].w), x_group + j * 32, lane4,
                       x_used);
    add_scaled_block(acc, d, sc, j, code2, mean);
  }
}

// A lane's sums for x rows m0, m0 + 1 and output rows g, g + 8 of `tile`: y, with the LoRA term and bias, where
// p.partial is null (one K split), else the split's partial sums.
template <typename T>
__device__ __forceinline__ void store_tiled_sums(const LoraLinearParams<T>& p, const float (&acc)[2][2],
                                                 const float* xa_s, int64_t tile, int g, int m0) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int m = m0 + e;
      if (m >= p.M) continue;
      const int64_t n = tile * kTileOrderRows + g + 8 * h;
      if (p.partial == nullptr)
        p.y[m * p.N + n] = VecIO<T>::from_float(acc[h][e] + lora_term(p, xa_s, m, n));
      else
        p.partial[(static_cast<int64_t>(blockIdx.y) * p.M + m) * p.N + n] = acc[h][e];
    }
}

// One group of a lane in registers (before sm_90): the four blocks' 16 bytes (x, y: row g; z, w: row g + 8).
template <bool kDoubleQuant>
struct TiledGroup {
  uint4 w[kTiledGemvGroupBlocks];
  TiledScales<kDoubleQuant> s;
};

// Stages rows 0..M-1 of x's K split [k_begin, k_begin + split_k) in xs, tiled_x_words(split_k) words a row. Pair
// 8s + t + 4e of a block (x[k = 16s + 2t + 8e], the lane's B fragment e of step s) goes to word 8t + 2s + e. A granule
// is 16 bytes, pairs 4q .. 4q + 3 of a row (32-bit counts: at most 16 rows of a K split). A thread's kTiledXLoads
// loads are issued before its stores: one at a time, 8 rows of x at K = 8192 took 16 round trips before the first
// weight was read.
template <typename T>
__device__ __forceinline__ void stage_tiled_x(const T* x, int64_t M, int64_t K, int64_t k_begin, int64_t split_k,
                                              uint32_t* xs, int tid, int threads) {
  const int64_t x_words = tiled_x_words(split_k);
  const uint32_t granules = static_cast<uint32_t>(split_k / 8), x_granules = static_cast<uint32_t>(M) * granules;
  for (uint32_t first_i = tid; first_i < x_granules; first_i += threads * kTiledXLoads) {
    uint4 v[kTiledXLoads];
#pragma unroll
    for (int u = 0; u < kTiledXLoads; ++u) {
      const uint32_t i = first_i + u * threads;
      if (i < x_granules) v[u] = __ldg(reinterpret_cast<const uint4*>(x + (i / granules) * K + k_begin) + i % granules);
    }
#pragma unroll
    for (int u = 0; u < kTiledXLoads; ++u) {
      const uint32_t i = first_i + u * threads;
      if (i >= x_granules) break;
      const uint32_t m = i / granules, q = i % granules;
      const int first = 4 * static_cast<int>(q % 8);
      uint32_t* d = xs + m * x_words + q / 8 * 32 + 2 * (first / 8) + first / 4 % 2;
      d[0] = v[u].x;
      d[8] = v[u].y;
      d[16] = v[u].z;
      d[24] = v[u].w;
    }
  }
}

// A warp's shared-memory slot on sm_90 (the kernel's layout, tiled_x_offset): the copy engine brings the tile's next
// group into it while the warp decodes the one before. start() (lane 0) sets up the barrier and copies group 0;
// take() waits for `group`, reads the lane's 16 bytes of each of its blocks, and has lane 0 copy the next group in.
struct TiledSlot {
  uint32_t bar, data;
  const uint8_t* w_tile;  // the tile's bytes of the warp's K split
  __device__ TiledSlot(const uint8_t* smem, int warp, const uint8_t* tile_bytes) : w_tile(tile_bytes) {
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    bar = base + kTiledBarrierOffset + 8 * warp;
    data = base + kTiledSlotOffset + warp * kTiledGemvGroupBytes;
  }
  __device__ void copy(int group) const {
    mbar_arrive_expecting(bar, kTiledGemvGroupBytes);
    bulk_copy_to_shared(data, w_tile + int64_t{group} * kTiledGemvGroupBytes, kTiledGemvGroupBytes, bar, kL2EvictFirst);
  }
  __device__ void start() const {
    mbar_init(bar, 1);
    mbar_init_fence();
    copy(0);
  }
  __device__ void take(int group, int groups, int lane, uint4 (&w)[kTiledGemvGroupBlocks]) const {
    mbar_wait(bar, static_cast<uint32_t>(group) & 1u);
#pragma unroll
    for (int j = 0; j < kTiledGemvGroupBlocks; ++j) w[j] = load_shared16(data + j * kTileOrderBytes + lane * 16);
    if (group + 1 < groups) {
      __syncwarp();  // every lane has read the slot
      if (lane == 0) {
        fence_before_copies();
        copy(group + 1);
      }
    }
  }
};

// Grid (ceil(N / 16 / warps), splits); splits divide K / kTiledGemvGroupK. p.partial == nullptr: one split, which
// adds the LoRA term and bias and writes y; else the split's sums go to p.partial for lora_epilogue_kernel.
template <typename T, QuantType QT, bool kDoubleQuant>
__global__ void __launch_bounds__(kTiledGemvMaxWarps * 32, 1) lora_gemv_tiled_kernel(const LoraLinearParams<T> p) {
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
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const TiledSlot slot(smem, warp, w_tile);
  if (has_tile && lane == 0) slot.start();  // the first group is in flight while x is staged
#endif
  // The tables' and the scales' start-up loads, issued before x's so that all share one round trip to memory: in
  // turn (x, then the code values, then code2) they had held the first weight loads back by three. H200, 2026-12-01,
  // tools/small_m_op.cu --tiled, two interleaved runs, µs: M = 1 8192² 23.9 -> 23.4, 8192x28672 51.0 -> 50.5,
  // 28672x8192 52.9 -> 52.4; M = 8 4096² 14.7 -> 14.1; y the same bit for bit.
  const float lane_value = lane_code_value<QT>();
  const float code2_value = kDoubleQuant && tid < 256 ? p.scales.code2[tid] : 0.0f;
  const float mean = kDoubleQuant ? *p.scales.offset : 0.0f;

  stage_tiled_x(p.x, p.M, p.K, k_begin, split_k, xs, tid, threads);
  fill_lane_pair_table<T>(table, [&](int code) { return __shfl_sync(0xffffffffu, lane_value, code); }, tid, threads);
  if constexpr (kDoubleQuant) {
    if (tid < 256) code2[tid] = code2_value;
    for (int i = tid + threads; i < 256; i += threads) code2[i] = p.scales.code2[i];  // CTAs under 256 threads
  }
  __syncthreads();

  float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};  // [row g, g + 8][x rows 2t, 2t + 1]
  if (has_tile) {
    const int64_t row_block[2] = {(tile * kTileOrderRows + g) * blocks_per_row + b_begin,
                                  (tile * kTileOrderRows + g + 8) * blocks_per_row + b_begin};
    const uint32_t table_base = static_cast<uint32_t>(__cvta_generic_to_shared(table));
    const uint32_t lane4 = lane * 4;
    const uint32_t* x_row = xs + (g < p.M ? g : p.M - 1) * x_words + 8 * t;
    const auto decode = [&](const uint4 (&w)[kTiledGemvGroupBlocks], const TiledScales<kDoubleQuant>& sc, int group) {
      decode_tiled_group<T>(acc, table_base, w, sc, x_row + kTiledGemvGroupBlocks * group * 32, g < p.M, lane4, code2,
                            mean);
    };
    const auto load_scales = [&](TiledScales<kDoubleQuant>& sc, int group) {
      load_tiled_scales(sc, p.scales, row_block, group);
    };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The scales are read a group ahead: eight groups share a 32-byte sector, so most come from L1.
    TiledScales<kDoubleQuant> next;
    load_scales(next, 0);
#pragma unroll 1
    for (int group = 0; group < groups; ++group) {
      uint4 w[kTiledGemvGroupBlocks];
      slot.take(group, groups, lane, w);
      const TiledScales<kDoubleQuant> sc = next;
      if (group + 1 < groups) load_scales(next, group + 1);
      decode(w, sc, group);
    }
#else
    const uint8_t* w_at = w_tile + lane * 16;
    const auto load = [&](TiledGroup<kDoubleQuant>& gr, int group) {
#pragma unroll
      for (int j = 0; j < kTiledGemvGroupBlocks; ++j)
        gr.w[j] = load_streaming16(w_at + (kTiledGemvGroupBlocks * group + j) * kTileOrderBytes);
      load_scales(gr.s, group);
    };
    TiledGroup<kDoubleQuant> ring[kTiledGemvGroups];
#pragma unroll
    for (int i = 0; i < kTiledGemvGroups; ++i)
      if (i < groups) load(ring[i], i);
    for (int base = 0; base < groups; base += kTiledGemvGroups) {
#pragma unroll
      for (int i = 0; i < kTiledGemvGroups; ++i) {
        const int group = base + i;
        if (group >= groups) break;
        decode(ring[i].w, ring[i].s, group);
        if (group + kTiledGemvGroups < groups) load(ring[i], group + kTiledGemvGroups);  // the others stay in flight
      }
    }
#endif
  }
  allow_dependent_launch();
  const bool fused_epilogue = p.partial == nullptr;
  if (fused_epilogue && p.lora_B != nullptr) {  // every thread: the staging shuffles and syncs
    wait_for_prior_grid();  // xa_partial comes from lora_down
    stage_lora_rows(p, xa_s, 0, static_cast<int>(p.M));
    __syncthreads();
  }
  if (has_tile) store_tiled_sums(p, acc, xa_s, tile, g, 2 * t);
  wait_for_prior_grid();  // so that this grid's completion implies lora_down's
}

// What the tiled GEMV launches: warps a CTA, K splits, grid and shared memory; scratch_floats as LoraLinearPlan's.
// xa_beside: x·Aᵀ by lora_down_mma on an SM the GEMV leaves free, into a bfloat16 [M, r] buffer, where lora_down_kernel
// ahead of the GEMV held a CTA's start on each SM it ran on (the GEMV's CTA takes a whole SM's registers).
struct TiledGemvPlan {
  int warps = 0;
  int splits = 0;
  int xa_splits = 0;
  bool xa_beside = false;
  int r = 0;
  dim3 grid;
  size_t smem = 0;
  int64_t scratch_floats = 0;
};

// The launch for M rows of x (N a multiple of 16, K of kTiledGemvGroupK), false where x's rows of a K split do not fit
// shared memory at any split. The split count and warps a CTA keep one CTA an SM: the most warps in flight, then the
// most SMs busy, then the fewest idle warps. xa_beside: lora_down_mma takes one SM beside it.
inline bool choose_tiled_gemv_launch(int64_t M, int64_t N, int64_t K, int r, bool xa_beside, int num_sms,
                                     TiledGemvPlan* plan) {
  const int64_t tiles = N / kTileOrderRows, groups = K / kTiledGemvGroupK;
  const int sms = xa_beside ? num_sms - 1 : num_sms;  // lora_down_mma takes one CTA at up to 16 rows
  TiledGemvPlan best;
  int64_t best_key[3] = {-1, -1, -1};
  for (int64_t splits = 1; splits <= std::min<int64_t>(groups, kTiledGemvMaxSplits); ++splits) {
    if (groups % splits != 0) continue;
    for (int warps = kTiledGemvMaxWarps; warps >= 1; --warps) {
      const int64_t smem = tiled_gemv_smem(M, K / splits, r, splits == 1, warps);
      const int64_t ctas = (tiles + warps - 1) / warps * splits;
      if (ctas > sms || smem > kTiledGemvMaxSmem) continue;
      const int64_t key[3] = {tiles * splits, ctas, -ctas * warps};
      if (std::lexicographical_compare(best_key, best_key + 3, key, key + 3)) {
        std::copy(key, key + 3, best_key);
        best.warps = warps;
        best.splits = static_cast<int>(splits);
        best.grid = dim3(static_cast<unsigned>((tiles + warps - 1) / warps), static_cast<unsigned>(splits));
        best.smem = static_cast<size_t>(smem);
      }
    }
  }
  if (best.warps == 0) return false;
  best.r = r;
  best.xa_beside = xa_beside;
  best.xa_splits = r > 0 && !xa_beside ? lora_down_splits(K) : 0;
  best.scratch_floats = gemv_scratch_floats(M, N, r, best.xa_splits, best.splits);
  *plan = best;
  return true;
}

// nullptr and the plan where the tiled GEMV takes these sizes, else why not. bf16: whether x is bfloat16
// (lora_down_mma's type).
inline const char* plan_lora_gemv_tiled(int64_t M, int64_t N, int64_t K, int r, int64_t blocksize, bool bf16,
                                        int num_sms, TiledGemvPlan* plan) {
  if (M < 1 || M > kTiledGemvMaxM) return "x must have 1 to 8 rows";
  if (blocksize != kTileOrderK) return "blocksize must be 64";
  if (N % kTileOrderRows != 0 || K % kTiledGemvGroupK != 0)
    return "out_features (N) must be a multiple of 16 and in_features (K) of 256";
  const bool xa_beside = bf16 && r > 0 && lora_down_mma_supported(K, r);
  if (!choose_tiled_gemv_launch(M, N, K, r, xa_beside, num_sms, plan))
    return "x's rows of a K split do not fit shared memory";
  return nullptr;
}

// p.xa_partial, p.xa and p.partial are set here from `scratch` (plan.scratch_floats floats) and `xa` ([M, r], where
// plan.xa_beside); lora_A is [r, K]; p.x doubles as x_lora when x_lora is nullptr; p.packed is in tile order.
template <typename T>
cudaError_t launch_lora_gemv_tiled(LoraLinearParams<T> p, const TiledGemvPlan& plan, const T* x_lora, const T* lora_A,
                                   float* scratch, T* xa, QuantType quant_type, int num_sms, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.lora_B == nullptr) p.r = 0;
  if (p.r != plan.r) return cudaErrorInvalidValue;
  p.warp_splits = 1;
  p.xa = nullptr;
  place_gemv_scratch(p, scratch, plan.xa_splits, plan.splits);
  const bool overlap = dependent_launch_supported();
  cudaError_t err = cudaSuccess;
  if (plan.xa_beside && p.r > 0) {  // bfloat16 only (plan_lora_gemv_tiled)
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      if (xa == nullptr) return cudaErrorInvalidValue;
      p.xa = xa;
      err = launch_lora_down_mma(x_lora != nullptr ? x_lora : p.x, lora_A, xa, p.M, p.K, p.r, stream);
    } else {
      return cudaErrorInvalidValue;
    }
  } else {
    err = launch_lora_down(p, x_lora, lora_A, scratch, stream);
  }
  if (err != cudaSuccess) return err;
  const bool double_quant = p.scales.absmax == nullptr;
#define QLORA_TILED_CASE(QT_, DQ_)                                                                          \
  if (quant_type == QT_ && double_quant == DQ_) {                                                          \
    constexpr auto kernel = lora_gemv_tiled_kernel<T, QT_, DQ_>;                                           \
    err = opt_in_dynamic_smem<kernel>(kTiledGemvMaxSmem);                                                  \
    if (err == cudaSuccess)                                                                                \
      err = launch_maybe_dependent(kernel, plan.grid, dim3(plan.warps * 32), plan.smem, stream, overlap && p.r > 0, p); \
  }
  QLORA_TILED_CASE(QuantType::NF4, true) QLORA_TILED_CASE(QuantType::NF4, false)
  QLORA_TILED_CASE(QuantType::FP4, true) QLORA_TILED_CASE(QuantType::FP4, false)
#undef QLORA_TILED_CASE
  if (err != cudaSuccess || plan.splits == 1) return err;
  return launch_lora_epilogue(p, plan.splits, num_sms, overlap, stream);
}

}  // namespace qlora
