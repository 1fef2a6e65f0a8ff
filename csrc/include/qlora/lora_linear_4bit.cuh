// Fused 4-bit linear + LoRA for small M: y = x·dequant(W)ᵀ + s·(x_lora·Aᵀ)·Bᵀ (+ bias).
// Torch-free: raw pointers and a stream in, cudaError_t out.
//
// Three kernels, in stream order:
//   lora_down_kernel      xa_partial[split][m][j] = Σ_{k in split} x_lora[m,k]·A[j,k]  (fp32, fixed order)
//   the GEMV              lora_gemv_scaled_kernel (blocksize 64) or lora_gemv_4bit_kernel (any blocksize): the
//                         weight is streamed once and dequantized in registers into mma.sync A fragments; x is
//                         the B operand (the "swap AB" trick: N fills the 16-row side of m16n8k16, M the 8-column
//                         side). With one K split over CTAs it also runs the epilogue; with several it writes fp32
//                         partial sums. (The block-scaled kernel may split K among a CTA's warps too, summed in
//                         shared memory.)
//   lora_epilogue_kernel  (split-K only) sums the partials in fixed order, adds s·xa·B[n,:] and the bias.
// Every sum has a fixed order, so results are bitwise reproducible.
//
// Layout constraints of the fused path (the caller falls back to dequantize + GEMM otherwise):
//   K % 32 == 0: a thread's 32-element unit of a row is then one aligned 16-byte load and lies inside one
//   quantization block (blocksizes are powers of two >= 32); x, packed, A 16-byte aligned and contiguous.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "qlora/launch.cuh"
#include "qlora/pairs.cuh"
#include "qlora/quantize_4bit.cuh"

namespace qlora {

constexpr int kGemvWarps = 4;            // warps per CTA; each owns one 16-row tile of W
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvChunk = 128;          // K elements a warp consumes per step (4 threads x 32 per row)
constexpr int kGemvUnroll = 4;           // chunks whose weights are loaded before the first is used
constexpr int kGemvMinSplitK = 512;      // smallest K range worth a split of its own
constexpr int kGemvSplitAlign = 256;     // a split's K range is a multiple of this (one block-scaled step)
constexpr int kGemvMaxSplits = 32;
constexpr int kLoraDownThreads = 256;
constexpr int kLoraDownSplitK = 512;     // K range of one lora_down CTA: at M = 1 a single long CTA took 6.6 us
constexpr int kEpilogueThreads = 256;
constexpr int kMaxLoraSmemBytes = 48 * 1024;  // xa staged per CTA: rows * r floats


// Arguments shared by the GEMV and epilogue kernels.
template <typename T>
struct LoraLinearParams {
  const T* x;               // [M, K] contiguous
  const uint8_t* packed;    // W [N, K] packed, two codes per byte
  BlockScales scales;
  const T* bias;            // [N] or nullptr
  const T* lora_B;          // [N, r] contiguous, or nullptr (no LoRA)
  const float* xa_partial;  // [xa_splits, M, r] from lora_down_kernel
  const T* xa;              // or [M, r] from lora_down_mma when not nullptr (the tiled GEMV)
  int xa_splits;
  int warp_splits;          // K splits inside a CTA of the block-scaled kernel (a power of two), 1: none
  int r;
  float scale;              // s = alpha / r
  float* partial;           // [splits, M, N] fp32 when split-K
  T* y;                     // [M, N]
  int64_t M, N, K;
  int log2_blocksize;
};

// Length of each K split when K is cut into `splits` ranges of whole kGemvSplitAlign steps (the last range may
// be shorter): the launcher's split count and the kernels' ranges both come from it.
__host__ __device__ inline int64_t split_k_length(int64_t K, int64_t splits) {
  return ((K + splits - 1) / splits + kGemvSplitAlign - 1) / kGemvSplitAlign * kGemvSplitAlign;
}

// ---- x_lora·Aᵀ ----------------------------------------------------------------------------------------
// Grid (xa_splits, M). Warp w takes LoRA rows j = w, w+8, ...; its lanes stride the CTA's K range in 8-element
// units and reduce with shuffles, so every (split, m, j) sum has one fixed order.
template <typename T>
__global__ void __launch_bounds__(kLoraDownThreads) lora_down_kernel(const T* __restrict__ x, const T* __restrict__ A,
                                                                     float* __restrict__ xa_partial, int64_t M,
                                                                     int64_t K, int r) {
  allow_dependent_launch();
  const int split = blockIdx.x;
  const int64_t m = blockIdx.y;
  const int64_t k_begin = static_cast<int64_t>(split) * kLoraDownSplitK;
  const int64_t k_end = K < k_begin + kLoraDownSplitK ? K : k_begin + kLoraDownSplitK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* xrow = x + m * K;
  for (int j = warp; j < r; j += kLoraDownThreads / 32) {
    const T* arow = A + static_cast<int64_t>(j) * K;
    float acc = 0.0f;
#pragma unroll 4
    for (int64_t k = k_begin + lane * 8; k < k_end; k += 32 * 8) {
      float xv[8], av[8];
      VecIO<T>::load8(xrow + k, xv);
      VecIO<T>::load8(arow + k, av);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc = fmaf(xv[i], av[i], acc);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) xa_partial[(static_cast<int64_t>(split) * M + m) * r + j] = acc;
  }
}

// xa_s[mm][j] = s · Σ_split xa_partial[split][m0 + mm][j] for the CTA's rows, in shared memory (s · xa[m0 + mm][j]
// where p.xa is given). A value's splits are shared by a group of lanes (a power of two, at most a warp: as many as
// the CTA's threads allow) and added by a fixed shuffle tree, so the order is still fixed. With one thread summing
// all of a value's splits (56 at K = 28672) the split-K epilogue took 9.8 µs with LoRA against 4.1 without; now 6.6
// (H200, M = 1, 8192x28672, torch.profiler, 2026-11-29).
template <typename T>
__device__ __forceinline__ void stage_lora_rows(const LoraLinearParams<T>& p, float* xa_s, int64_t m0, int rows) {
  const int count = rows * p.r;
  if (p.xa != nullptr) {
    for (int i = threadIdx.x; i < count; i += blockDim.x)
      if (m0 + i / p.r < p.M) xa_s[i] = VecIO<T>::to_float(p.xa[m0 * p.r + i]) * p.scale;
    return;
  }
  int lanes = 32;
  while (lanes > 1 && (lanes * count > static_cast<int>(blockDim.x) || lanes / 2 >= p.xa_splits)) lanes /= 2;
  const int per_round = static_cast<int>(blockDim.x) / lanes, sub = static_cast<int>(threadIdx.x) % lanes;
  for (int first = 0; first < count; first += per_round) {  // the same trip count in every thread: all shuffle
    const int i = first + static_cast<int>(threadIdx.x) / lanes;
    const int64_t m = m0 + i / p.r;
    float acc = 0.0f;
    if (i < count && m < p.M)
      for (int s = sub; s < p.xa_splits; s += lanes) acc += p.xa_partial[(static_cast<int64_t>(s) * p.M + m) * p.r + i % p.r];
    for (int offset = lanes / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (i < count && sub == 0) xa_s[i] = acc * p.scale;
  }
}

// Column n's bias and row of B as floats, loaded before the split-K epilogue waits for the GEMV: both are the op's
// inputs, which no launch of the op writes, so their round trip to memory runs beside the wait instead of after it.
// Ranks above kMaxRank load in lora_term instead.
struct LoraColumn {
  static constexpr int kMaxRank = 16;
  float bias;
  float b[kMaxRank];
};
template <typename T>
__device__ __forceinline__ LoraColumn load_lora_column(const LoraLinearParams<T>& p, int64_t n) {
  LoraColumn c;
  c.bias = p.bias != nullptr ? VecIO<T>::to_float(p.bias[n]) : 0.0f;
  if (p.lora_B == nullptr || p.r > LoraColumn::kMaxRank) return c;
  const T* brow = p.lora_B + n * p.r;
  if (p.r % 8 == 0 && reinterpret_cast<uintptr_t>(p.lora_B) % 16 == 0) {
#pragma unroll
    for (int j = 0; j < LoraColumn::kMaxRank; j += 8)
      if (j < p.r) VecIO<T>::load8(brow + j, c.b + j);
  } else {
#pragma unroll
    for (int j = 0; j < LoraColumn::kMaxRank; ++j)
      if (j < p.r) c.b[j] = VecIO<T>::to_float(brow[j]);
  }
  return c;
}

// bias[n] + Σ_j xa_s[mm][j]·B[n][j] in fp32.
template <typename T>
__device__ __forceinline__ float lora_term(const LoraLinearParams<T>& p, const float* xa_s, int mm, int64_t n) {
  float acc = p.bias != nullptr ? VecIO<T>::to_float(p.bias[n]) : 0.0f;
  if (p.lora_B != nullptr) {
    const T* brow = p.lora_B + n * p.r;
    const float* xrow = xa_s + mm * p.r;
    int j = 0;
    // 16-byte loads where B's rows allow them (r % 8 == 0): r scalar loads a row in a loop of unknown length
    // kept the split-K epilogue at 8.6 µs with LoRA against 2.3 without, 7.5 against 2.9 with them in another run
    // (H200, M = 16, 8192x28672, torch.profiler). The same order of sums as the scalar loop.
    if (p.r % 8 == 0 && reinterpret_cast<uintptr_t>(p.lora_B) % 16 == 0)
      for (; j < p.r; j += 8) {
        float b[8];
        VecIO<T>::load8(brow + j, b);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(xrow[j + i], b[i], acc);
      }
    for (; j < p.r; ++j) acc = fmaf(xrow[j], VecIO<T>::to_float(brow[j]), acc);
  }
  return acc;
}
// The same sum from a column loaded ahead (load_lora_column), in the same order.
template <typename T>
__device__ __forceinline__ float lora_term(const LoraLinearParams<T>& p, const LoraColumn& c, const float* xa_s,
                                           int mm, int64_t n) {
  if (p.lora_B != nullptr && p.r > LoraColumn::kMaxRank) return lora_term(p, xa_s, mm, n);
  float acc = c.bias;
  if (p.lora_B != nullptr) {
    const float* xrow = xa_s + mm * p.r;
#pragma unroll
    for (int j = 0; j < LoraColumn::kMaxRank; ++j)
      if (j < p.r) acc = fmaf(xrow[j], c.b[j], acc);
  }
  return acc;
}

// d[t] += A · B_t for each n8 tile t of x rows, B_t the 4 elements of x row t at x_at[t] + offset (x_ok[t]
// && k_ok; zeros otherwise, so out-of-range lanes add exact zeros).
template <typename T, int MT8>
__device__ __forceinline__ void mma_x_tiles(float (&d)[MT8][4], const uint32_t (&a)[4], const T* const (&x_at)[MT8],
                                            const bool (&x_ok)[MT8], bool k_ok, int64_t offset) {
#pragma unroll
  for (int t = 0; t < MT8; ++t) {
    uint32_t b[2] = {0u, 0u};
    if (x_ok[t] && k_ok) {
      const uint2 xv = __ldg(reinterpret_cast<const uint2*>(x_at[t] + offset));
      b[0] = xv.x;
      b[1] = xv.y;
    }
    MmaType<T>::mma(d[t], a, b);
  }
}

// The byte -> pair table once per lane: lane l reads entry b at word 32·b + l, always in bank l, so the
// random code bytes of a warp never collide on a bank (a single 256-entry table serialised ~3-4 ways).
// Entry b is 32 copies of one pair; a thread writes 4 of them at once with a 16-byte store. Also stages
// code2 (double quantization). The caller syncs.
template <typename T, QuantType QT>
__device__ __forceinline__ void fill_tables(const LoraLinearParams<T>& p, typename MmaType<T>::Pair* pair_lut,
                                            float* smem_code2) {
  const float* values = code_values<QT>();
  if (p.scales.code2 != nullptr)
    for (int byte = threadIdx.x; byte < 256; byte += blockDim.x) smem_code2[byte] = p.scales.code2[byte];
  for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {
    const int byte = i / 8;
    // Low half = first element (high nibble), as the mma fragment wants the lower k in the low half.
    const uint32_t v = as_u32(MmaType<T>::pair(values[byte >> 4], values[byte & 15]));
    reinterpret_cast<uint4*>(pair_lut)[i] = make_uint4(v, v, v, v);
  }
}

// Stores a warp's accumulators: acc[t][0..1] = (row g, x rows 2c, 2c+1), acc[t][2..3] = (row g+8, same).
// With a fused epilogue the output element gets the LoRA term and bias; otherwise the split's partial sum.
template <typename T, int MT8>
__device__ __forceinline__ void store_tile(const LoraLinearParams<T>& p, const float (&acc)[MT8][4],
                                           const int64_t (&rows)[2], const bool (&row_ok)[2], int64_t m0,
                                           const float* xa_s, bool fused_epilogue) {
  const int c = threadIdx.x % 4;
#pragma unroll
  for (int t = 0; t < MT8; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int h = i / 2;
      const int mm = 8 * t + 2 * c + (i % 2);
      const int64_t m = m0 + mm;
      if (!row_ok[h] || m >= p.M) continue;
      const int64_t n = rows[h];
      if (fused_epilogue) {
        p.y[m * p.N + n] = VecIO<T>::from_float(acc[t][i] + lora_term(p, xa_s, mm, n));
      } else {
        p.partial[(static_cast<int64_t>(blockIdx.y) * p.M + m) * p.N + n] = acc[t][i];
      }
    }
  }
}

// ---- the fused dequantize-GEMV ------------------------------------------------------------------------------
// Grid (ceil(N/16/kGemvWarps), splits, ceil(M/(8·MT8))). Warp = one 16-row tile of W over one K split, for
// 8·MT8 rows of x.
//
// k permutation: a dot product does not care about the order of k, so each mma k-step uses whichever k the
// registers already hold, as long as the A (weight) and B (x) fragments agree. Lane (g = lane/4, c = lane%4)
// loads the 16 packed bytes of rows g and g+8 covering k in [k0 + 32c, k0 + 32c + 32) of a 128-wide chunk;
// in step s (0..7) its fragment slots {2c, 2c+1, 2c+8, 2c+9} hold k0 + 32c + 4s + {0, 1, 2, 3}, i.e. packed
// bytes 2s and 2s+1, and x[m][k0 + 32c + 4s .. +4) is one 8-byte load for the B fragment.
//
// Dequantization: a shared-memory LUT maps a byte to its two code values as a T pair (one 4-byte load per two
// elements); the block scale is applied as hi + lo parts (T pairs) with one mul and one fma, so the weight is
// within about one rounding of T(value · absmax), the value a dequantize to T would give.
//
// MT8: n8 tiles of x rows handled per warp (M up to 8·MT8 per grid z slice); each dequantized weight fragment
// is reused for all of them.
template <typename T, QuantType QT, int MT8>
__global__ void __launch_bounds__(kGemvThreads) lora_gemv_4bit_kernel(const LoraLinearParams<T> p) {
  using Pair = typename MmaType<T>::Pair;
  __shared__ __align__(16) Pair pair_lut[256 * 32];
  __shared__ float smem_code2[256];
  extern __shared__ float xa_s[];  // [8·MT8][r] when LoRA or bias is fused here

  constexpr int kRows = 8 * MT8;
  const int64_t m0 = static_cast<int64_t>(blockIdx.z) * kRows;
  fill_tables<T, QT>(p, pair_lut, smem_code2);
  const bool fused_epilogue = p.partial == nullptr;
  if (fused_epilogue && p.lora_B != nullptr) {
    wait_for_prior_grid();  // xa_partial comes from lora_down
    stage_lora_rows(p, xa_s, m0, kRows);
  }
  __syncthreads();

  const bool double_quant = p.scales.absmax == nullptr;
  const float mean = double_quant ? *p.scales.offset : 0.0f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const int64_t n_tile = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * 16;
  if (n_tile >= p.N) return;  // no barrier follows
  const int64_t rows[2] = {n_tile + g, n_tile + g + 8};
  const bool row_ok[2] = {rows[0] < p.N, rows[1] < p.N};
  const int64_t row_safe[2] = {row_ok[0] ? rows[0] : 0, row_ok[1] ? rows[1] : 0};

  const int64_t k_split = split_k_length(p.K, gridDim.y);
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_split;
  const int64_t k_end = p.K < k_begin + k_split ? p.K : k_begin + k_split;

  // x rows this lane feeds into the B fragment: m0 + 8t + g.
  const T* xrow[MT8];
  bool x_ok[MT8];
#pragma unroll
  for (int t = 0; t < MT8; ++t) {
    const int64_t m = m0 + 8 * t + g;
    x_ok[t] = m < p.M;
    xrow[t] = p.x + (x_ok[t] ? m : 0) * p.K;
  }

  float acc[MT8][4] = {};
  {
    for (int64_t kc = k_begin; kc < k_end; kc += kGemvChunk * kGemvUnroll) {
      // All of the group's weight loads are issued before any is used: 2·kGemvUnroll 16-byte loads in flight.
      // The scales' raw loads are issued here too; decoding a double-quantized scale (a shared-memory lookup
      // indexed by the loaded code) waits until the compute phase, so no load in this loop waits on another.
      uint4 wq[kGemvUnroll][2];
      float sc[kGemvUnroll][2];        // plain absmax, or absmax2 of the block when double-quantized
      uint32_t qcode[kGemvUnroll][2];  // the block's 8-bit absmax code when double-quantized
      bool in_range[kGemvUnroll][2];
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int64_t k = kc + u * kGemvChunk + 32 * c;
        const bool k_ok = k < k_end;  // K % 32 == 0, so a unit is all in or all out
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const bool ok = k_ok && row_ok[h];
          in_range[u][h] = ok;
          const int64_t e = row_safe[h] * p.K + (ok ? k : 0);
          const int64_t block = e >> p.log2_blocksize;
          wq[u][h] = ok ? __ldg(reinterpret_cast<const uint4*>(p.packed + e / 2)) : make_uint4(0, 0, 0, 0);
          qcode[u][h] = ok && double_quant ? __ldg(p.scales.qabsmax + block) : 0u;
          sc[u][h] = !ok ? 0.0f : double_quant ? __ldg(p.scales.absmax2 + block / kAbsmaxBlocksize) : __ldg(p.scales.absmax + block);
        }
      }
      if (double_quant) {
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u)
#pragma unroll
          for (int h = 0; h < 2; ++h)  // code2[q] * absmax2 + mean, rounded twice as bitsandbytes does
            sc[u][h] = in_range[u][h] ? mul_then_add(smem_code2[qcode[u][h]], sc[u][h], mean) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int64_t k = kc + u * kGemvChunk + 32 * c;
        // Lanes whose unit is past k_end hold zero weights; their x loads are skipped too, so they add exact zeros.
        const bool k_ok = k < k_end;
        const SplitScale<T> split[2] = {split_scale<T>(sc[u][0]), split_scale<T>(sc[u][1])};
        const uint32_t words[2][4] = {{wq[u][0].x, wq[u][0].y, wq[u][0].z, wq[u][0].w},
                                      {wq[u][1].x, wq[u][1].y, wq[u][1].z, wq[u][1].w}};
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          // Bytes 2s and 2s+1 of each row: word s/2, byte pair (s%2)·2.
          uint32_t a[4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t w = words[h][s / 2] >> (16 * (s % 2));
            const Pair v0 = pair_lut[(w & 0xffu) * 32 + lane];
            const Pair v1 = pair_lut[((w >> 8) & 0xffu) * 32 + lane];
            a[h] = scaled_pair<T>(v0, split[h]);      // slots 2c, 2c+1
            a[2 + h] = scaled_pair<T>(v1, split[h]);  // slots 2c+8, 2c+9
          }
          mma_x_tiles<T, MT8>(acc, a, xrow, x_ok, k_ok, k + 4 * s);
        }
      }
    }
  }

  allow_dependent_launch();
  store_tile<T, MT8>(p, acc, rows, row_ok, m0, xa_s, fused_epilogue);
  wait_for_prior_grid();
}

// ---- the block-scaled dequantize-GEMV (blocksize 64, K % 64 == 0, small M) -------------------------------------
// Same grid and warp roles as lora_gemv_4bit_kernel with kScaledWarps warps per CTA, but the packed weights
// are streamed through a per-warp ring of shared-memory stages (scaled_stages) by cp.async, so each warp keeps
// all but one of them in flight while it computes (register-staged loads left the warps waiting
// on memory: 1.4-1.7 TB/s on the large shapes, against 1.9 with the ring).
//
// A step is 256 k. Lane c of a row group takes 8 bytes (16 k) of each 64-k block of the step, so the 16 k of
// every mma lie in one quantization block: the code values enter the mma unscaled and each block's scale
// multiplies the block's partial sums once (the general loop scales every weight pair before the mma).
// Lane c loads and decodes the scale of block c of the step for its rows, two steps ahead; the row group
// swaps them by shuffle.
//
// Ring layout of one stage: row r's 128 bytes as four 32-byte segments, segment j stored at slot j ^ (r & 3),
// so the 16 lanes of a half-warp (4 rows x 4 lanes, 8 bytes each from segment j) hit 32 distinct banks.
//
// Where the mma's B fragments (x) come from, XSource:
//   Global  L1 loads inside the dependent chain, 8 warps a CTA;
//   Split   the CTA's x rows for its whole K range, copied into shared memory once before the loop (up to
//           kScaledSplitMaxXBytes), so 16 warps share one copy and one table;
//   Ring    x rows for each 256-k step, copied alongside the weights into a CTA-wide ring of the same depth
//           (one barrier a step), for M or K too large for Split; 8 warps at MT8 = 4 (128 registers spill).
//
// Warp splits (Split only): the warp_splits warps of a row tile (consecutive warps) split the CTA's K range again,
// and the tile's first warp adds their sums in split order. The plan moves the K splits into the CTAs that way
// where x still fits, keeping the warps of one wave: 128 CTAs of 8192x8192 at M = 1, with 4 warps a row tile, took
// 27.5 µs against 29.3 for 4 CTA splits and the split-K epilogue; 8192x28672 61.6 against 65.6 (2 and 2);
// 14336x4096 26.1 against 27.4 (tools/small_m_op.cu, r = 16, H200, 2026-11-30).
enum class XSource { Global, Split, Ring };
constexpr int kScaledWarps = 8;
constexpr int kScaledStagedWarps = 16;
// 3 stages against 4 (tools/small_m_op.cu, r = 16, H200, 2026-11-30, two interleaved runs, y the same bit for bit):
// M = 1 8192x28672 62.3 -> 61.0 µs, 8192² 27.7 -> 26.5, 4096x14336 27.2 -> 25.9, 11008x4096 23.5 -> 22.4, 28672x8192
// 65.5 -> 64.8; M = 2 8192x28672 62.9 -> 61.3; M = 4-16 within 0.5. 5 stages lost 1-13 µs; 2 changed the split
// counts (the 8-warp form's occupancy) and lost up to 21 µs.
constexpr int kScaledStages = 3;
// The Split form (16 warps, x staged once) 2 stages against 3, same tool: M = 1 8192x28672 60.7 -> 59.7 µs, 14336x4096
// 25.3 -> 24.2, 11008x4096 22.5 -> 21.3, 4096² 16.4 -> 15.9; M = 8 8192² 29.7 -> 27.6; every Split shape gained.
constexpr int kScaledSplitStages = 2;
__host__ __device__ constexpr int scaled_stages(XSource x_source) {
  return x_source == XSource::Split ? kScaledSplitStages : kScaledStages;
}
constexpr int kScaledStepRowBytes = kGemvSplitAlign / 2;     // 128 packed bytes of a row per step
constexpr int kScaledStageBytes = 16 * kScaledStepRowBytes;  // one warp's 16 rows
// Dynamic shared memory of the 16-warp kernels (ring, x, LoRA rows): the static table (32 KB) and code2 take
// the rest of the SM's 227 KB.
constexpr int kScaledStagedMaxDynamicSmem = 190 * 1024;
__host__ __device__ constexpr int scaled_warps(XSource x_source, int mt8) {
  return x_source == XSource::Global || mt8 > 2 ? kScaledWarps : kScaledStagedWarps;
}
__host__ __device__ constexpr int scaled_ring_bytes(XSource x_source, int warps) {
  return warps * scaled_stages(x_source) * kScaledStageBytes;
}
constexpr int kScaledRingBytes = scaled_ring_bytes(XSource::Global, kScaledWarps);  // the 8-warp form's
// Row stride of staged x in elements: the K range (a split, or one step of the ring) plus 16 bytes, so that
// the rows of a quarter-warp's 16-byte loads fall in different banks.
__host__ __device__ inline int64_t staged_x_stride(int64_t k_range) { return k_range + 8; }
constexpr int kRingXStride = kGemvSplitAlign + 8;
// Shared-memory bytes of x for a CTA of `rows` rows of x (of M in all) and a split of k_split, elements of
// `elem` bytes: the launcher sizes the allocation with it and the kernel finds what follows x with it.
__host__ __device__ inline int64_t staged_x_bytes(XSource x_source, int64_t M, int64_t rows, int64_t k_split,
                                                  int64_t elem) {
  return x_source == XSource::Split  ? (M < rows ? M : rows) * staged_x_stride(k_split) * elem
         : x_source == XSource::Ring ? rows * kRingXStride * elem * kScaledStages
                                     : 0;
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T, QuantType QT, int MT8, XSource kX>
__global__ void __launch_bounds__(scaled_warps(kX, MT8) * 32) lora_gemv_scaled_kernel(const LoraLinearParams<T> p) {
  using Pair = typename MmaType<T>::Pair;
  constexpr bool kSplitX = kX == XSource::Split, kRingX = kX == XSource::Ring;
  constexpr int kWarps = scaled_warps(kX, MT8);
  constexpr int kStages = scaled_stages(kX);
  constexpr int kRingBytes = scaled_ring_bytes(kX, kWarps);
  __shared__ __align__(16) Pair pair_lut[256 * 32];
  __shared__ float smem_code2[256];
  // The ring, then x (Split: [min(M, 8·MT8)][staged_x_stride]; Ring: [kScaledStages][8·MT8][kRingXStride]),
  // then xa_s [8·MT8][r] if fused here.
  extern __shared__ __align__(16) uint8_t dynamic_smem[];

  constexpr int kRows = 8 * MT8;
  const int64_t m0 = static_cast<int64_t>(blockIdx.z) * kRows;
  // The CTA's K range (x is staged for all of it); its warp_splits warps of a row tile split it again.
  const int64_t cta_k_split = split_k_length(p.K, gridDim.y);
  const int64_t cta_k_begin = static_cast<int64_t>(blockIdx.y) * cta_k_split;
  const int64_t cta_k_end = p.K < cta_k_begin + cta_k_split ? p.K : cta_k_begin + cta_k_split;
  const int64_t x_stride = kRingX ? kRingXStride : staged_x_stride(cta_k_split);
  const int x_rows = static_cast<int>(p.M - m0 < kRows ? p.M - m0 : kRows);
  T* xs = reinterpret_cast<T*>(dynamic_smem + kRingBytes);
  float* xa_s =
      reinterpret_cast<float*>(dynamic_smem + kRingBytes + staged_x_bytes(kX, p.M, kRows, cta_k_split, sizeof(T)));
  if constexpr (kSplitX) {  // issued first, so that the copy overlaps the table fill
    const int64_t granules = (cta_k_end - cta_k_begin) / 8;  // 16 bytes each; K % 64 == 0
    for (int64_t i = threadIdx.x; i < x_rows * granules; i += kWarps * 32) {
      const int64_t r = i / granules, q = i % granules;
      cp_async16(xs + r * x_stride + q * 8, p.x + (m0 + r) * p.K + cta_k_begin + q * 8);
    }
    cp_async_commit();
  }
  fill_tables<T, QT>(p, pair_lut, smem_code2);
  const bool fused_epilogue = p.partial == nullptr;
  const int warp_splits = kSplitX ? p.warp_splits : 1;
  // With warp splits the CTA meets once more after its main loop, and stages xa only then: lora_down runs
  // beside the loop instead of ahead of it.
  if (fused_epilogue && p.lora_B != nullptr && warp_splits == 1) {
    wait_for_prior_grid();  // xa_partial comes from lora_down
    stage_lora_rows(p, xa_s, m0, kRows);
  }
  if constexpr (kSplitX) cp_async_wait<0>();
  __syncthreads();

  const bool double_quant = p.scales.absmax == nullptr;
  const float mean = double_quant ? *p.scales.offset : 0.0f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const int warp_split = warp & (warp_splits - 1);
  const int64_t n_tile = (static_cast<int64_t>(blockIdx.x) * (kWarps / warp_splits) + warp / warp_splits) * 16;
  const int64_t warp_k_split = split_k_length(cta_k_end - cta_k_begin, warp_splits);
  const int64_t k_begin = cta_k_begin + warp_split * warp_k_split;
  const int64_t k_end = cta_k_end < k_begin + warp_k_split ? cta_k_end : k_begin + warp_k_split;
  // Ring and warp splits: every warp meets the barriers, so a warp past N runs on row 0 unstored.
  if (!kRingX && warp_splits == 1 && n_tile >= p.N) return;  // no barrier follows
  const int64_t rows[2] = {n_tile + g, n_tile + g + 8};
  const bool row_ok[2] = {rows[0] < p.N, rows[1] < p.N};

  // Rows past N read row 0 and x rows past M read row 0 (both exist): what they produce lands only in
  // accumulator entries the store skips, so only the k range needs checks, and only in a split's last step.
  // Copy roles: lane copies 16-byte granule q = lane % 8 (64-k block q / 2) of rows lane / 8 + 4i.
  uint8_t* ring = dynamic_smem + warp * kStages * kScaledStageBytes;
  const int cq = lane % 8;
  const uint8_t* src[4];
  uint32_t dst[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = lane / 8 + 4 * i;
    const int64_t n = n_tile + r < p.N ? n_tile + r : 0;
    src[i] = p.packed + n * (p.K / 2) + cq * 16;
    dst[i] = r * kScaledStepRowBytes + (((cq / 2) ^ (r & 3)) * 32) + (cq % 2) * 16;
  }
  const auto issue = [&](int64_t kc, int stage) {
    if (kc < k_end && kc + 64 * (cq / 2) < k_end) {
#pragma unroll
      for (int i = 0; i < 4; ++i) cp_async16(ring + stage * kScaledStageBytes + dst[i], src[i] + kc / 2);
    }
    if constexpr (kRingX) {  // 32 granules of 16 bytes a row; x rows past M are not copied (nor read)
      T* xs_stage = xs + stage * kRows * kRingXStride;
      for (int i = threadIdx.x; i < x_rows * 32; i += kWarps * 32) {
        const int r = i / 32, q = i % 32;
        if (kc + 8 * q < k_end) cp_async16(xs_stage + r * kRingXStride + 8 * q, p.x + (m0 + r) * p.K + kc + 8 * q);
      }
    }
    cp_async_commit();  // also when empty, so that wait_group counts steps
  };
  uint32_t read_off[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < 4; ++j) read_off[h][j] = (g + 8 * h) * kScaledStepRowBytes + ((j ^ (g & 3)) * 32) + 8 * c;

  const uint32_t lane_offset = static_cast<uint32_t>(lane) * 4;
  const char* lut_bytes = reinterpret_cast<const char*>(pair_lut);
  // Entry b of this lane's table: byte offset 128·b + 4·lane.
  const auto lookup = [&](uint32_t byte_in_low_bits) {
    return *reinterpret_cast<const uint32_t*>(lut_bytes + (((byte_in_low_bits & 0xffu) << 7) | lane_offset));
  };
  const int group_lane0 = lane & ~3;
  int64_t row_e[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) row_e[h] = (row_ok[h] ? rows[h] : 0) * p.K;
  // This lane's x row at k = 16c: in global memory (at k = 0), staged for the split (at k_begin), or in stage 0
  // of the ring (at the step's first k).
  const T* x_lane[MT8];
#pragma unroll
  for (int t = 0; t < MT8; ++t) {
    const int64_t m = m0 + 8 * t + g;
    const int staged_row = 8 * t + g < x_rows ? 8 * t + g : 0;
    x_lane[t] = kSplitX  ? xs + staged_row * x_stride + 16 * c - cta_k_begin
                : kRingX ? xs + staged_row * x_stride + 16 * c
                         : p.x + (m < p.M ? m : 0) * p.K + 16 * c;
  }
  // The raw loads of this lane's scale (block c of the step) for both rows.
  const auto load_scale = [&](int64_t kc, uint32_t (&q)[2], float (&a)[2]) {
    const bool ok = kc + 64 * c < k_end;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t block = ((row_e[h] + kc) >> 6) + c;
      q[h] = ok && double_quant ? __ldg(p.scales.qabsmax + block) : 0u;
      a[h] = !ok ? 0.0f : double_quant ? __ldg(p.scales.absmax2 + (block >> 8)) : __ldg(p.scales.absmax + block);
    }
  };

  float acc[MT8][4] = {};
  uint32_t q0[2], q1[2];
  float a0[2], a1[2];
  load_scale(k_begin, q0, a0);
  load_scale(k_begin + kGemvSplitAlign, q1, a1);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(k_begin + s * kGemvSplitAlign, s);

  const auto step = [&](int64_t kc, int stage, auto checked) {
    constexpr bool kChecked = decltype(checked)::value;
    bool block_ok[4];  // K % 64 == 0: a 64-k block is in range for all lanes or none
#pragma unroll
    for (int j = 0; j < 4; ++j) block_ok[j] = !kChecked || kc + 64 * j < k_end;
    const uint8_t* buf = ring + stage * kScaledStageBytes;
    uint2 wq[2][4];  // [row h][block j]
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wq[h][j] = block_ok[j] ? *reinterpret_cast<const uint2*>(buf + read_off[h][j]) : make_uint2(0, 0);
    float my_scale[2];
    const bool scale_ok = !kChecked || kc + 64 * c < k_end;
#pragma unroll
    for (int h = 0; h < 2; ++h)  // code2[q] * absmax2 + mean, rounded twice as bitsandbytes does
      my_scale[h] = !scale_ok ? 0.0f : double_quant ? mul_then_add(smem_code2[q0[h]], a0[h], mean) : a0[h];
    float sc[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j) sc[h][j] = __shfl_sync(0xffffffffu, my_scale[h], group_lane0 + j);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // x[m][k .. k + 16) for this lane's 16 k of block j: two 16-byte loads, four mma steps' B fragments.
      uint4 xv[MT8][2];
#pragma unroll
      for (int t = 0; t < MT8; ++t) {
        const T* x_step = kRingX ? x_lane[t] + stage * kRows * kRingXStride : x_lane[t] + kc;
        const uint4* xp = reinterpret_cast<const uint4*>(x_step + 64 * j);
        if constexpr (kSplitX || kRingX) {
          xv[t][0] = block_ok[j] ? xp[0] : make_uint4(0, 0, 0, 0);
          xv[t][1] = block_ok[j] ? xp[1] : make_uint4(0, 0, 0, 0);
        } else {
          xv[t][0] = block_ok[j] ? __ldg(xp) : make_uint4(0, 0, 0, 0);
          xv[t][1] = block_ok[j] ? __ldg(xp + 1) : make_uint4(0, 0, 0, 0);
        }
      }
      float part[MT8][4] = {};
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        // Bytes 2s and 2s+1 of the lane's 8 bytes of each row: k + 4s + {0, 1} and k + 4s + {2, 3}.
        uint32_t a[4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t w = (s < 2 ? wq[h][j].x : wq[h][j].y) >> (16 * (s % 2));
          a[h] = lookup(w);           // slots 2c, 2c+1
          a[2 + h] = lookup(w >> 8);  // slots 2c+8, 2c+9
        }
#pragma unroll
        for (int t = 0; t < MT8; ++t) {
          const uint4& v = xv[t][s / 2];
          const uint32_t b[2] = {s % 2 == 0 ? v.x : v.z, s % 2 == 0 ? v.y : v.w};
          MmaType<T>::mma(part[t], a, b);
        }
      }
#pragma unroll
      for (int t = 0; t < MT8; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] = fmaf(part[t][i], sc[i / 2][j], acc[t][i]);
    }
  };

  int stage = 0;
  for (int64_t kc = k_begin; kc < k_end; kc += kGemvSplitAlign) {
    if constexpr (kRingX) {
      cp_async_wait<kStages - 2>();  // this step's stage has landed, for the copies of this thread;
      __syncthreads();  // of every thread; and every warp is done with the stage refilled next
    }
    issue(kc + (kStages - 1) * kGemvSplitAlign, (stage + kStages - 1) % kStages);
    uint32_t q2[2];
    float a2[2];
    load_scale(kc + 2 * kGemvSplitAlign, q2, a2);
    if constexpr (!kRingX) cp_async_wait<kStages - 1>();  // this step's stage has landed
    __syncwarp();
    if (kc + kGemvSplitAlign <= k_end)
      step(kc, stage, std::false_type{});
    else
      step(kc, stage, std::true_type{});
    __syncwarp();  // the stage is refilled next iteration
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      q0[h] = q1[h];
      a0[h] = a1[h];
      q1[h] = q2[h];
      a1[h] = a2[h];
    }
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
  cp_async_wait<0>();
  if (warp_splits > 1) {
    // Each warp's sums go to its own ring, which it is done with; the tile's first warp adds them in split order.
    __syncwarp();
    float* sums = reinterpret_cast<float*>(ring);
#pragma unroll
    for (int t = 0; t < MT8; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) sums[(4 * t + i) * 32 + lane] = acc[t][i];
    if (fused_epilogue && p.lora_B != nullptr) {
      wait_for_prior_grid();  // xa_partial comes from lora_down
      stage_lora_rows(p, xa_s, m0, kRows);
    }
    __syncthreads();
    if (warp_split != 0 || n_tile >= p.N) {
      wait_for_prior_grid();
      return;
    }
    for (int s = 1; s < warp_splits; ++s) {
      const float* other = reinterpret_cast<const float*>(ring + s * kStages * kScaledStageBytes);
#pragma unroll
      for (int t = 0; t < MT8; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] += other[(4 * t + i) * 32 + lane];
    }
  }
  allow_dependent_launch();
  store_tile<T, MT8>(p, acc, rows, row_ok, m0, xa_s, fused_epilogue);
  wait_for_prior_grid();
}

// Split-K epilogue. Grid (ceil(N / kEpilogueThreads), ceil(M / rows_per_cta)); a thread owns column n for
// the CTA's rows, summing the splits in order. Its loads go out in two round trips, not four: B and the bias before
// the wait, the first row's partial sums beside xa's. H200, 2026-12-01, tools/small_m_op.cu, two interleaved runs,
// r = 16, y the same bit for bit, µs: tiled GEMV M = 1 4096² 14.0 -> 13.1, 8192² 23.6 -> 22.6, 8192x28672 50.6 ->
// 49.8, 14336x4096 23.0 -> 21.6; fused kernel M = 16 4096² 19.6 -> 18.1, 8192² 32.8 -> 31.0.
template <typename T>
__global__ void __launch_bounds__(kEpilogueThreads) lora_epilogue_kernel(const LoraLinearParams<T> p, int splits,
                                                                         int rows_per_cta) {
  extern __shared__ float xa_s[];  // [rows_per_cta][r]
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * rows_per_cta;
  const int rows = static_cast<int>(p.M - m0 < rows_per_cta ? p.M - m0 : rows_per_cta);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kEpilogueThreads + threadIdx.x;
  const LoraColumn column = load_lora_column(p, n < p.N ? n : p.N - 1);
  wait_for_prior_grid();  // the GEMV's partial sums (and, through the GEMV, lora_down's)
  // The first row's first kSplitsAhead partial sums, loaded before xa is staged so that both share a round trip.
  constexpr int kSplitsAhead = 8;
  float first_row[kSplitsAhead];
#pragma unroll
  for (int s = 0; s < kSplitsAhead; ++s)
    first_row[s] = n < p.N && s < splits ? p.partial[(static_cast<int64_t>(s) * p.M + m0) * p.N + n] : 0.0f;
  if (p.lora_B != nullptr) stage_lora_rows(p, xa_s, m0, rows);
  __syncthreads();
  if (n >= p.N) return;
  for (int mm = 0; mm < rows; ++mm) {
    const int64_t m = m0 + mm;
    float acc = 0.0f;
    int s = 0;
    if (mm == 0) {
#pragma unroll
      for (int a = 0; a < kSplitsAhead; ++a)
        if (a < splits) acc += first_row[a];
      s = kSplitsAhead;
    }
    for (; s < splits; ++s) acc += p.partial[(static_cast<int64_t>(s) * p.M + m) * p.N + n];
    p.y[m * p.N + n] = VecIO<T>::from_float(acc + lora_term(p, column, xa_s, mm, n));
  }
}

// ---- launchers -----------------------------------------------------------------------------------------

inline int lora_down_splits(int64_t K) { return static_cast<int>((K + kLoraDownSplitK - 1) / kLoraDownSplitK); }

// A split count made exact: the split length is rounded up to whole steps, so the count can come out lower.
inline int exact_splits(int64_t K, int64_t splits) {
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, K / kGemvMinSplitK, kGemvMaxSplits}));
  const int64_t per = split_k_length(K, splits);
  return static_cast<int>((K + per - 1) / per);
}

// K splits of the general loop: enough warps that every SM streams (about 16 per SM), each split at least
// kGemvMinSplitK long.
inline int lora_gemv_splits(int64_t N, int64_t K, int num_sms) {
  const int64_t tiles = (N + 15) / 16;
  const int64_t want_warps = static_cast<int64_t>(num_sms) * 16;
  return exact_splits(K, (want_warps + tiles - 1) / tiles);
}

// K splits of the block-scaled kernel: as many as one wave of resident warps holds, so no CTA waits for a
// second wave (a count that spilled into one, e.g. 5 splits of 8192x28672 with 2112 warp slots, lost ~25 %).
inline int lora_scaled_splits(int64_t N, int64_t K, int64_t grid_z, int64_t warp_slots) {
  const int64_t warp_tiles = (N + 15) / 16 * grid_z;
  return exact_splits(K, warp_slots / warp_tiles);
}

// x rows per grid z slice, by M: the n8 tiles one warp covers.
inline int lora_gemv_mt8(int64_t M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }
constexpr int kScaledMaxMT8 = 4;  // registers: 106 at MT8 = 1, 186 at 4 (one CTA per SM)
constexpr int kScaledSplitMaxMT8 = 2;  // 16 warps a CTA: at most 128 registers a thread
// Split copies x before the loop, unoverlapped with the weights. H200, forward µs, 8192x28672: M = 4 (57 KB a
// CTA) 85 that way and 76.7 through the ring; M = 2 (29 KB) 69.5 by Split; M = 8 75.0 through the ring. With 3
// ring stages (2026-11-30, tools/small_m_op.cu): 28672x8192 M = 2 (33 KB) 74.7 through the ring, 65.6 by Split;
// 8192² M = 2 28.0 with 2 CTA splits, 27.6 with 4 warps a row tile and none. With the Split ring at 2 stages (64 KB)
// x may take the rest of the 190 KB, while the warp splits still keep a CTA's x within 48 KB (57 KB lost: 8192x28672
// M = 2 59.9 -> 61.4 with 2 warps a row tile). Ring -> Split: 28672x8192 M = 3 76.7 -> 65.7 µs, M = 4 75.3 -> 65.1,
// M = 6 (96 KB) 75.6 -> 66.7, M = 7 77.5 -> 72.5; 8192x28672 M = 4 (57 KB) 70.1 -> 63.3 (tools/small_m_op.cu, r = 16,
// H200, 2026-11-30, two interleaved runs, y the same bit for bit). A step comes where the CTA's shared memory (33 KB
// static, 1 KB reserved, ring, x, LoRA rows) passes 196 KB, likely the SM's carveout going to 228 KB (L1 from 60 KB to
// 28): 28672x8192 M = 6 66.7 (194.6 KB) and M = 7 72.5 (210.6 KB); 8192x28672 M = 6 64.2 (182.1 KB) and M = 7 78.4
// (196.1 KB), M = 8 78.3 against 70.0 through the ring, which the op leaves to the tensor-core GEMM (fused_max_m).
constexpr size_t kScaledSplitMaxXBytes = 124 * 1024;
constexpr size_t kWarpSplitMaxXBytes = 48 * 1024;

// Rows of x one epilogue CTA covers: few enough that the grid has about two CTAs per SM (at M = 16 one CTA
// per 64 rows left 16 CTAs on 132 SMs and took 18.7 us), and their xa (rows · r floats) fits shared memory.
inline int lora_epilogue_rows(int64_t M, int64_t N, int r, int num_sms) {
  const int64_t columns = (N + kEpilogueThreads - 1) / kEpilogueThreads;
  const int64_t to_fill = std::max<int64_t>(1, M * columns / (2 * static_cast<int64_t>(num_sms)));
  const int smem_rows = r > 0 ? kMaxLoraSmemBytes / static_cast<int>(sizeof(float)) / r : 64;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({64, smem_rows, to_fill})));
}

// CTAs of the block-scaled kernel one SM holds with its ring (no staged LoRA rows); asked of the runtime once
// per device.
template <typename T, QuantType QT, int MT8>
cudaError_t scaled_ctas_per_sm(int* ctas) {
  constexpr auto kernel = lora_gemv_scaled_kernel<T, QT, MT8, XSource::Global>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static int known[64] = {};
  if (device < 64 && known[device] > 0) {
    *ctas = known[device];
    return cudaSuccess;
  }
  err = opt_in_dynamic_smem<kernel>(kScaledRingBytes + kMaxLoraSmemBytes);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, kernel, kScaledWarps * 32, kScaledRingBytes);
  if (err == cudaSuccess && device < 64) known[device] = *ctas;
  return err;
}

// A warp's K range below which the K splits stay across CTAs: with 2 steps a warp (4096x4096, 1024x4096 at
// M = 1) the split-K epilogue's launch, overlapped, cost less than the CTA's wait for xa at the end.
constexpr int64_t kWarpSplitMinK = 4 * kGemvSplitAlign;

// The small-M launches' float scratch: x·Aᵀ's split partials [xa_splits, M, r], then, where the GEMV splits K over
// CTAs, its split sums [splits, M, N] for lora_epilogue_kernel.
inline int64_t gemv_scratch_floats(int64_t M, int64_t N, int r, int xa_splits, int splits) {
  return static_cast<int64_t>(xa_splits) * M * r + (splits > 1 ? static_cast<int64_t>(splits) * M * N : 0);
}
template <typename T>
void place_gemv_scratch(LoraLinearParams<T>& p, float* scratch, int xa_splits, int splits) {
  p.xa_splits = xa_splits;
  p.xa_partial = scratch;
  p.partial = splits > 1 ? scratch + static_cast<int64_t>(xa_splits) * p.M * p.r : nullptr;
}

// What launch_lora_linear_4bit will run, decided once so that the caller can size the scratch.
struct LoraLinearPlan {
  bool block_scaled = false;
  XSource x_source = XSource::Global;  // of the block-scaled kernel
  int mt8 = 1;
  int splits = 1;     // K splits of the GEMV over CTAs; > 1 adds the split-K epilogue kernel
  int warp_splits = 1;  // and within a CTA (block-scaled kernel with x staged once a CTA)
  int xa_splits = 0;  // lora_down CTAs per row (0 without LoRA)
  int r = 0;
  dim3 grid;                   // of the GEMV
  size_t gemv_smem = 0;        // its dynamic shared memory
  int64_t scratch_floats = 0;  // xa partials, then GEMV partials
};

// allow_block_scaled: take the block-scaled kernel where the layout allows it (blocksize 64, K % 64 == 0,
// grid z slices of up to 8 · kScaledMaxMT8 rows of x).
template <typename T>
cudaError_t plan_lora_linear_4bit(int64_t M, int64_t N, int64_t K, int r, int log2_blocksize, QuantType quant_type,
                                  int num_sms, bool allow_block_scaled, LoraLinearPlan* plan) {
  LoraLinearPlan pl;
  pl.r = r;
  pl.xa_splits = r > 0 ? lora_down_splits(K) : 0;
  pl.block_scaled = allow_block_scaled && block_scaled_layout(int64_t{1} << log2_blocksize, K);
  pl.mt8 = pl.block_scaled ? std::min(lora_gemv_mt8(M), kScaledMaxMT8) : lora_gemv_mt8(M);
  const int64_t grid_z = std::max<int64_t>(1, (M + 8 * pl.mt8 - 1) / (8 * pl.mt8));
  if (grid_z > 65535 || M > 65535) return cudaErrorInvalidConfiguration;
  if (pl.block_scaled) {
    int ctas = 0;
    cudaError_t err = cudaSuccess;
#define QLORA_SCALED_CASE(QT_, MT8_) \
  if (quant_type == QT_ && pl.mt8 == MT8_) err = scaled_ctas_per_sm<T, QT_, MT8_>(&ctas);
    QLORA_SCALED_CASE(QuantType::NF4, 1) QLORA_SCALED_CASE(QuantType::NF4, 2) QLORA_SCALED_CASE(QuantType::NF4, 4)
    QLORA_SCALED_CASE(QuantType::FP4, 1) QLORA_SCALED_CASE(QuantType::FP4, 2) QLORA_SCALED_CASE(QuantType::FP4, 4)
#undef QLORA_SCALED_CASE
    if (err != cudaSuccess) return err;
    pl.splits = lora_scaled_splits(N, K, grid_z, static_cast<int64_t>(std::max(ctas, 1)) * num_sms * kScaledWarps);
  } else {
    pl.splits = lora_gemv_splits(N, K, num_sms);
  }
  const auto lora_rows_bytes = [&] {  // xa staged where the GEMV finishes y itself
    return pl.splits == 1 ? static_cast<size_t>(8 * pl.mt8) * r * sizeof(float) : size_t{0};
  };
  // The same split count with twice the warps a CTA and one CTA an SM: the same warp slots.
  const auto x_bytes_of = [&](XSource x_source) {
    return static_cast<size_t>(staged_x_bytes(x_source, M, 8 * pl.mt8, split_k_length(K, pl.splits), sizeof(T)));
  };
  const auto fits = [&](XSource x_source) {
    return scaled_ring_bytes(x_source, scaled_warps(x_source, pl.mt8)) + x_bytes_of(x_source) + lora_rows_bytes() <=
           static_cast<size_t>(kScaledStagedMaxDynamicSmem);
  };
  const auto split_fits = [&](size_t max_x_bytes) {
    return pl.mt8 <= kScaledSplitMaxMT8 && x_bytes_of(XSource::Split) <= max_x_bytes && fits(XSource::Split);
  };
  if (pl.block_scaled)
    pl.x_source = split_fits(kScaledSplitMaxXBytes) ? XSource::Split : fits(XSource::Ring) ? XSource::Ring : XSource::Global;
  // Where x is staged once a CTA, the K splits move into the CTAs as far as the CTA's x still fits: the same
  // warps, without the split-K epilogue's launch and partial sums.
  if (pl.x_source == XSource::Split && split_k_length(K, pl.splits) >= kWarpSplitMinK) {
    const int splits = pl.splits;
    for (int ws = kScaledStagedWarps; ws > 1; ws /= 2) {
      if (splits % ws != 0) continue;
      pl.warp_splits = ws;
      pl.splits = splits / ws;
      if (split_fits(kWarpSplitMaxXBytes)) break;
      pl.warp_splits = 1;
      pl.splits = splits;
    }
  }
  // On the final split count, which the warp splits may have brought to 1.
  if (lora_rows_bytes() > static_cast<size_t>(kMaxLoraSmemBytes)) return cudaErrorInvalidValue;
  const size_t x_bytes = x_bytes_of(pl.x_source);
  const int64_t warps_per_cta = pl.block_scaled ? scaled_warps(pl.x_source, pl.mt8) : kGemvWarps;
  const int64_t tiles_per_cta = warps_per_cta / pl.warp_splits;
  const int64_t grid_x = ((N + 15) / 16 + tiles_per_cta - 1) / tiles_per_cta;
  if (grid_x > 0x7fffffff) return cudaErrorInvalidConfiguration;
  pl.grid = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(pl.splits), static_cast<unsigned>(grid_z));
  pl.gemv_smem = pl.x_source != XSource::Global ? scaled_ring_bytes(pl.x_source, warps_per_cta) + x_bytes + lora_rows_bytes()
                 : pl.block_scaled                ? kScaledRingBytes + lora_rows_bytes()
                                                  : lora_rows_bytes();
  pl.scratch_floats = gemv_scratch_floats(M, N, r, pl.xa_splits, pl.splits);
  *plan = pl;
  return cudaSuccess;
}

template <typename T, QuantType QT, int MT8, bool kBlockScaled, XSource kX>
constexpr auto gemv_kernel() {
  if constexpr (kBlockScaled)
    return lora_gemv_scaled_kernel<T, QT, MT8, kX>;
  else
    return lora_gemv_4bit_kernel<T, QT, MT8>;
}

template <typename T, QuantType QT, int MT8, bool kBlockScaled, XSource kX = XSource::Global>
cudaError_t launch_lora_gemv(const LoraLinearParams<T>& p, const LoraLinearPlan& plan, bool after_lora_down,
                             cudaStream_t stream) {
  constexpr auto kernel = gemv_kernel<T, QT, MT8, kBlockScaled, kX>();
  constexpr int max_smem = kX != XSource::Global ? kScaledStagedMaxDynamicSmem
                                                 : (kBlockScaled ? kScaledRingBytes : 0) + kMaxLoraSmemBytes;
  // The static pair table (~34 KB) plus the dynamic part (ring, staged x, LoRA rows) can exceed the default 48 KB.
  const cudaError_t err = opt_in_dynamic_smem<kernel>(max_smem);
  if (err != cudaSuccess) return err;
  const int threads = kBlockScaled ? scaled_warps(kX, MT8) * 32 : kGemvThreads;
  return launch_maybe_dependent(kernel, plan.grid, dim3(threads), plan.gemv_smem, stream, after_lora_down, p);
}

// x_lora·Aᵀ into xa_partial, [p.xa_splits, M, r], when the op has a LoRA branch (p.r > 0).
template <typename T>
cudaError_t launch_lora_down(const LoraLinearParams<T>& p, const T* x_lora, const T* lora_A, float* xa_partial,
                             cudaStream_t stream) {
  if (p.r == 0) return cudaSuccess;
  lora_down_kernel<T><<<dim3(p.xa_splits, static_cast<unsigned>(p.M)), kLoraDownThreads, 0, stream>>>(
      x_lora != nullptr ? x_lora : p.x, lora_A, xa_partial, p.M, p.K, p.r);
  return cudaGetLastError();
}

// The split-K epilogue over p.partial's `splits` sums, as a dependent of the GEMV when `dependent`.
template <typename T>
cudaError_t launch_lora_epilogue(const LoraLinearParams<T>& p, int splits, int num_sms, bool dependent,
                                 cudaStream_t stream) {
  const int epi_rows = lora_epilogue_rows(p.M, p.N, p.r, num_sms);
  const int64_t epi_y = (p.M + epi_rows - 1) / epi_rows;
  if (epi_y > 65535) return cudaErrorInvalidConfiguration;
  const size_t epi_smem = static_cast<size_t>(epi_rows) * p.r * sizeof(float);
  const dim3 epi_grid(static_cast<unsigned>((p.N + kEpilogueThreads - 1) / kEpilogueThreads), static_cast<unsigned>(epi_y));
  return launch_maybe_dependent(lora_epilogue_kernel<T>, epi_grid, dim3(kEpilogueThreads), epi_smem, stream, dependent,
                                p, splits, epi_rows);
}

// p.xa_partial and p.partial are set here from `scratch` (plan.scratch_floats floats); lora_A is [r, K].
// p.x doubles as x_lora when x_lora is nullptr.
template <typename T>
cudaError_t launch_lora_linear_4bit(LoraLinearParams<T> p, const LoraLinearPlan& plan, const T* x_lora,
                                    const T* lora_A, float* scratch, QuantType quant_type, int num_sms,
                                    cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.lora_B == nullptr) p.r = 0;
  if (p.r != plan.r) return cudaErrorInvalidValue;
  p.warp_splits = plan.warp_splits;
  place_gemv_scratch(p, scratch, plan.xa_splits, plan.splits);
  const bool overlap = dependent_launch_supported();
  const bool gemv_after_lora_down = overlap && p.r > 0;
  cudaError_t err = launch_lora_down(p, x_lora, lora_A, scratch, stream);
  if (err != cudaSuccess) return err;
  const int mt8 = plan.mt8;
#define QLORA_GEMV_CASE(QT_, MT8_, SCALED_)                                                \
  if (quant_type == QT_ && mt8 == MT8_ && plan.block_scaled == SCALED_ && plan.x_source == XSource::Global) \
    err = launch_lora_gemv<T, QT_, MT8_, SCALED_>(p, plan, gemv_after_lora_down, stream);
#define QLORA_STAGED_CASE(QT_, MT8_, X_)                               \
  if (quant_type == QT_ && mt8 == MT8_ && plan.x_source == XSource::X_) \
    err = launch_lora_gemv<T, QT_, MT8_, true, XSource::X_>(p, plan, gemv_after_lora_down, stream);
  QLORA_GEMV_CASE(QuantType::NF4, 1, false) QLORA_GEMV_CASE(QuantType::NF4, 2, false)
  QLORA_GEMV_CASE(QuantType::NF4, 4, false) QLORA_GEMV_CASE(QuantType::NF4, 8, false)
  QLORA_GEMV_CASE(QuantType::FP4, 1, false) QLORA_GEMV_CASE(QuantType::FP4, 2, false)
  QLORA_GEMV_CASE(QuantType::FP4, 4, false) QLORA_GEMV_CASE(QuantType::FP4, 8, false)
  QLORA_GEMV_CASE(QuantType::NF4, 1, true) QLORA_GEMV_CASE(QuantType::NF4, 2, true)
  QLORA_GEMV_CASE(QuantType::NF4, 4, true) QLORA_GEMV_CASE(QuantType::FP4, 1, true)
  QLORA_GEMV_CASE(QuantType::FP4, 2, true) QLORA_GEMV_CASE(QuantType::FP4, 4, true)
  QLORA_STAGED_CASE(QuantType::NF4, 1, Split) QLORA_STAGED_CASE(QuantType::NF4, 2, Split)
  QLORA_STAGED_CASE(QuantType::FP4, 1, Split) QLORA_STAGED_CASE(QuantType::FP4, 2, Split)
  QLORA_STAGED_CASE(QuantType::NF4, 1, Ring) QLORA_STAGED_CASE(QuantType::NF4, 2, Ring)
  QLORA_STAGED_CASE(QuantType::NF4, 4, Ring) QLORA_STAGED_CASE(QuantType::FP4, 1, Ring)
  QLORA_STAGED_CASE(QuantType::FP4, 2, Ring) QLORA_STAGED_CASE(QuantType::FP4, 4, Ring)
#undef QLORA_STAGED_CASE
#undef QLORA_GEMV_CASE
  if (err != cudaSuccess || plan.splits == 1) return err;
  return launch_lora_epilogue(p, plan.splits, num_sms, overlap, stream);
}

}  // namespace qlora
