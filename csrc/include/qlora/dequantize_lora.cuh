// W_eff = dequant(W) + s·B·A: the 4-bit weight with a LoRA adapter merged in, written densely in one pass.
// Torch-free: raw pointers and a stream in, cudaError_t out.
//
// Why: at large M, lora_linear_4bit dequantizes W for cuBLAS anyway; merging the adapter into that workspace
// replaces the low-rank GEMMs, which read all of x and write all of y (at M = 4096, 4096x4096 about 30 us),
// by one m16n8k16 mma per 128 weights.
//
// A CTA's kDequantizeLoraWarps warps take adjacent 64-column strips of the same rows (so the CTA reads 64
// contiguous packed bytes of each row, and its neighbour in blockIdx.x the next 64), and each warp walks
// kDequantizeLoraTiles 16-row tiles down its strip with the next tile's loads issued before the current tile's
// work. The adapter's columns for the strip (the mma's B operand) are loaded once per warp; per tile the mma
// gives s·B·A for the tile, and each lane adds it to the 32 weights it decodes. The mma's 8 output columns are
// mapped onto the strip so that a lane's outputs are 16 consecutive weights of a row: an 8-byte packed load and
// two 16-byte stores per row.
//
// Standalone on the H200 (2026-11-29, r = 16, NF4 + double quantization, CUDA events, 256 MB written between
// runs; outputs bit-identical), µs for 4096², 8192², 8192x28672, 28672x8192: dequantize_4bit alone 15.8, 47.6,
// 152.9, 152.8; the previous layout (4 warps a CTA over 64 rows of one strip, all loads first) 24.4, 72.6, 243.4,
// 226.3; this one 21.3, 63.1, 198.2, 193.5. Two tiles ahead, or 64 registers forced, were slower.
//
// Layout constraints (the caller falls back to dequantize + addmm otherwise): K % 16 == 0 (16 weights lie in
// one quantization block and start on a byte), r <= kDequantizeLoraMaxRank, out 16-byte aligned, packed 8-byte
// aligned.
//
// Tile order (qlora/tile_order.h, blocksize >= 64): a warp's 16-row tile of its 64-column strip is one 512-byte run,
// lane 4g + t's 16 bytes (bytes t, t + 4, ..., t + 28 of rows g and g + 8) one load. The quad transpose of
// dequantize_4bit turns them into bytes 4t .. 4t + 3 and 16 + 4t .. 16 + 4t + 3 of each row, so a lane's 16 weights of
// a row are two runs of 8, 32 columns apart, in one quantization block; the mma's columns follow them.
#pragma once

#include <cmath>

#include "qlora/common.cuh"
#include "qlora/lora_linear_4bit.cuh"

namespace qlora {

constexpr int kDequantizeLoraWarps = 2;  // on adjacent strips
constexpr int kDequantizeLoraCols = 64;  // a strip: 8 mma columns x 2 per lane x 4 lanes per row
// 16-row tiles a warp walks down its strip. 6 against 8 (tools/dequant_lora_shapes.cu, H200, µs, tile order / row-major):
// 4096² 18.8 / 20.3 against 19.6 / 21.0 (1376 CTAs, one wave of 12 an SM, where 8 left a third of the slots empty),
// 8192² 60.6 / 62.7 against 60.4 / 62.7, 8192x28672 184.6 / 196.7 against 187.4 / 196.8. 12 reads 1-2 % better on
// the larger two and 18 % worse at 4096²; s multiplying A once a warp instead of B each tile was 0.5-3 % slower.
constexpr int kDequantizeLoraTiles = 6;

// A CTA's shape (the library's by default; tools/dequant_lora_shapes.cu times others).
template <int kWarps = kDequantizeLoraWarps, int kTiles = kDequantizeLoraTiles>
struct DequantizeLoraShape {
  static constexpr int warps = kWarps, tiles = kTiles, threads = 32 * kWarps;
};

template <typename T>
struct DequantizeLoraParams {
  const uint8_t* packed;   // W [N, K], two codes per byte
  BlockScales scales;
  const T* lora_A;         // [r, K] contiguous
  const T* lora_B;         // [N, r] contiguous
  bool lora_B_pairs;       // r even and lora_B 4-byte aligned: two rank columns in one load
  bool tile_order;         // packed in tile order (N % 16 == 0, K % 64 == 0, blocksize >= 64)
  int r;
  float scale;
  T* out;                  // [N, K] contiguous
  int64_t N, K;
  int log2_blocksize;
};

__device__ __forceinline__ uint32_t load_u16_or_zero(const uint16_t* p, bool ok) { return ok ? __ldg(p) : 0u; }

// kScaleInB: s is a power of two, so s·B is exact in T and enters the mma, whose accumulators start at the
// dequantized weights; otherwise the mma gives B·A and each weight takes one more FMA.
template <typename T, QuantType QT, bool kDoubleQuant, int kRankChunks, bool kScaleInB, bool kTileOrder,
          typename Shape = DequantizeLoraShape<>>
__global__ void __launch_bounds__(Shape::threads) dequantize_lora_kernel(const DequantizeLoraParams<T> p) {
  const float lane_value = lane_code_value<QT>();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;  // the mma fragment's row group and column pair
  const int64_t K = p.K, N = p.N;
  const int64_t k0 = (static_cast<int64_t>(blockIdx.x) * Shape::warps + warp) * kDequantizeLoraCols;
  // First of this lane's output columns: 16 in a row, or in tile order 8 from here and 8 from kt + 32.
  const int64_t kt = k0 + (kTileOrder ? 8 : 16) * t;
  const bool cols_ok = kt < K;
  const int64_t first_row = static_cast<int64_t>(blockIdx.y) * Shape::tiles * 16;
  const auto* A = reinterpret_cast<const uint16_t*>(p.lora_A);
  const auto* B = reinterpret_cast<const uint16_t*>(p.lora_B);

  // What one tile needs from memory: rows g and g + 8 of the weights and their scale inputs (absmax, or the
  // 8-bit code and absmax2 of the block until the code is looked up), and the mma's A operand, B's rows.
  struct TileLoads {
    uint2 words[2];
    uint32_t qcodes[2];
    float scales[2];
    uint32_t b_rows[kRankChunks][4];
  };
  const auto load_tile = [&](int tile, TileLoads& l) {
    const int64_t n0 = first_row + 16 * tile;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = n0 + g + 8 * h;
      const bool ok = row < N && cols_ok;
      const int64_t e0 = row * K + kt;
      const int64_t block = e0 >> p.log2_blocksize;
      if constexpr (!kTileOrder) l.words[h] = ok ? __ldg(reinterpret_cast<const uint2*>(p.packed + e0 / 2)) : make_uint2(0, 0);
      l.qcodes[h] = kDoubleQuant && ok ? __ldg(p.scales.qabsmax + block) : 0u;
      l.scales[h] = !ok ? 0.0f : kDoubleQuant ? __ldg(p.scales.absmax2 + block / kAbsmaxBlocksize) : __ldg(p.scales.absmax + block);
    }
    if constexpr (kTileOrder) {  // whole tiles: N % 16 == 0 and K % 64 == 0
      const int64_t run = (n0 / kTileOrderRows * (K / kTileOrderK) + k0 / kTileOrderK) * kTileOrderBytes;
      const uint4 v = cols_ok && n0 < N ? __ldg(reinterpret_cast<const uint4*>(p.packed + run) + lane) : make_uint4(0, 0, 0, 0);
      l.words[0] = make_uint2(v.x, v.y);
      l.words[1] = make_uint2(v.z, v.w);
    }
#pragma unroll
    for (int c = 0; c < kRankChunks; ++c)
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // rows g, g + 8 for rank columns 2t, 2t + 1, then 2t + 8, 2t + 9
        const int64_t row = n0 + g + 8 * (q % 2);
        const int j = 16 * c + 2 * t + 8 * (q / 2);
        const uint16_t* src = B + row * p.r + j;
        const bool ok = row < N && j < p.r;
        l.b_rows[c][q] = p.lora_B_pairs ? (ok ? __ldg(reinterpret_cast<const uint32_t*>(src)) : 0u)
                                        : load_u16_or_zero(src, ok) | load_u16_or_zero(src + 1, ok && j + 1 < p.r) << 16;
      }
  };
  TileLoads cur, next;
  load_tile(0, cur);

  // B operand of mma i: column c is weight column k0 + 16·(c / 2) + 2i + c % 2, so that lane t's outputs
  // (columns 2t, 2t + 1 of every mma) are the 16 weights from kt on; in tile order k0 + 8·(c / 2) + 2·(i % 4) +
  // 32·(i / 4) + c % 2, the 8 from kt and the 8 from kt + 32. Rank rows past r are zero.
  uint32_t bfrag[kRankChunks][8][2];
#pragma unroll
  for (int c = 0; c < kRankChunks; ++c) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t k = kTileOrder ? k0 + 8 * (g / 2) + g % 2 + 2 * (i % 4) + 32 * (i / 4) : k0 + 16 * (g / 2) + g % 2 + 2 * i;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = 16 * c + 2 * t + 8 * h;
        const bool ok = k < K;
        bfrag[c][i][h] = load_u16_or_zero(A + j * K + k, ok && j < p.r) |
                         load_u16_or_zero(A + (j + 1) * K + k, ok && j + 1 < p.r) << 16;
      }
    }
  }
  __shared__ float smem_code2[256];
  float mean = 0.0f;
  if constexpr (kDoubleQuant) {  // staged after the first loads are issued, so the barrier overlaps their latency
    mean = *p.scales.offset;     // before the barrier: after it, its own round trip followed the first loads'
    for (int i = threadIdx.x; i < 256; i += Shape::threads) smem_code2[i] = p.scales.code2[i];
    __syncthreads();
  }

  for (int tile = 0; tile < Shape::tiles; ++tile) {
    const int64_t n0 = first_row + 16 * tile;
    if (n0 >= N) break;
    if (tile + 1 < Shape::tiles) load_tile(tile + 1, next);
    if constexpr (kTileOrder)  // the whole warp: n0 and cols_ok are the same for all its lanes
#pragma unroll
      for (int h = 0; h < 2; ++h)
        cur.words[h] = make_uint2(tile_order_quad_transpose<1>(cur.words[h].x, t), tile_order_quad_transpose<1>(cur.words[h].y, t));
    float scales[2];
#pragma unroll
    for (int h = 0; h < 2; ++h)  // code2[q] * absmax2 + mean, rounded twice as bitsandbytes does
      scales[h] = kDoubleQuant ? mul_then_add(smem_code2[cur.qcodes[h]], cur.scales[h], mean) : cur.scales[h];
    const int64_t rows[2] = {n0 + g, n0 + g + 8};
    float w[2][16];  // the dequantized weights of rows g and g + 8, in column order
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // every lane shuffles, also out of range, so that all 32 take part
        const uint32_t word = i < 4 ? cur.words[h].x : cur.words[h].y;
        const int shift = 8 * (i % 4);
        w[h][2 * i] = __fmul_rn(__shfl_sync(0xffffffffu, lane_value, static_cast<int>(word >> (shift + 4))), scales[h]);
        w[h][2 * i + 1] = __fmul_rn(__shfl_sync(0xffffffffu, lane_value, static_cast<int>(word >> shift)), scales[h]);
      }
    }
    float acc[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][q] = kScaleInB ? w[q / 2][2 * i + q % 2] : 0.0f;
#pragma unroll
    for (int c = 0; c < kRankChunks; ++c) {
      uint32_t a[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        a[q] = cur.b_rows[c][q];
        if constexpr (kScaleInB) {
          const float2 f = MmaType<T>::unpack(a[q]);
          a[q] = as_u32(MmaType<T>::pair(f.x * p.scale, f.y * p.scale));
        }
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) MmaType<T>::mma(acc[i], a, bfrag[c][i]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (rows[h] >= N || !cols_ok) continue;
      float v[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const float low_rank = acc[i / 2][2 * h + i % 2];
        v[i] = kScaleInB ? low_rank : fmaf(p.scale, low_rank, w[h][i]);
      }
      T* dst = p.out + rows[h] * K + kt;
      VecIO<T>::store8(dst, v);
      VecIO<T>::store8(dst + (kTileOrder ? 32 : 8), v + 8);
    }
    cur = next;
  }
}

template <typename T, QuantType QT, bool kDoubleQuant, bool kScaleInB, bool kTileOrder,
          typename Shape = DequantizeLoraShape<>>
cudaError_t launch_dequantize_lora_as(const DequantizeLoraParams<T>& p, cudaStream_t stream) {
  const int64_t strips = (p.K + kDequantizeLoraCols - 1) / kDequantizeLoraCols;
  const int64_t strip_groups = (strips + Shape::warps - 1) / Shape::warps;
  const int64_t rows_per_cta = int64_t{Shape::tiles} * 16;
  const int64_t row_groups = (p.N + rows_per_cta - 1) / rows_per_cta;
  if (strip_groups > 0x7fffffff || row_groups > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(strip_groups), static_cast<unsigned>(row_groups));
  const int chunks = (p.r + 15) / 16;
  if (chunks == 1) {
    dequantize_lora_kernel<T, QT, kDoubleQuant, 1, kScaleInB, kTileOrder, Shape><<<grid, Shape::threads, 0, stream>>>(p);
  } else if (chunks == 2) {
    dequantize_lora_kernel<T, QT, kDoubleQuant, 2, kScaleInB, kTileOrder, Shape><<<grid, Shape::threads, 0, stream>>>(p);
  } else {
    dequantize_lora_kernel<T, QT, kDoubleQuant, 4, kScaleInB, kTileOrder, Shape><<<grid, Shape::threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, QuantType QT, bool kTileOrder>
cudaError_t launch_dequantize_lora_for(const DequantizeLoraParams<T>& p, cudaStream_t stream) {
  int exponent = 0;
  const bool power_of_two = std::frexp(p.scale, &exponent) == 0.5f && exponent >= -7 && exponent <= 9;
  if (p.scales.absmax == nullptr)
    return power_of_two ? launch_dequantize_lora_as<T, QT, true, true, kTileOrder>(p, stream)
                        : launch_dequantize_lora_as<T, QT, true, false, kTileOrder>(p, stream);
  return power_of_two ? launch_dequantize_lora_as<T, QT, false, true, kTileOrder>(p, stream)
                      : launch_dequantize_lora_as<T, QT, false, false, kTileOrder>(p, stream);
}

template <typename T>
cudaError_t launch_dequantize_lora(const DequantizeLoraParams<T>& p, QuantType quant_type, cudaStream_t stream) {
  if (!dequantize_lora_supported(p.K, p.r)) return cudaErrorInvalidValue;
  if (p.tile_order && (!tile_order_supported(p.N, p.K) || (int64_t{1} << p.log2_blocksize) < kTileOrderK))
    return cudaErrorInvalidValue;
  if (p.N == 0 || p.K == 0) return cudaSuccess;
  if (p.tile_order)
    return quant_type == QuantType::NF4 ? launch_dequantize_lora_for<T, QuantType::NF4, true>(p, stream)
                                        : launch_dequantize_lora_for<T, QuantType::FP4, true>(p, stream);
  return quant_type == QuantType::NF4 ? launch_dequantize_lora_for<T, QuantType::NF4, false>(p, stream)
                                      : launch_dequantize_lora_for<T, QuantType::FP4, false>(p, stream);
}

}  // namespace qlora
