// Blockwise 4-bit quantization (NF4, FP4), double quantization of the absmax, and dequantization.
// Torch-free: raw pointers and a stream in, cudaError_t out. Layout (bitsandbytes-compatible): blocks of
// `blocksize` consecutive elements, one float32 absmax per block, two codes per byte, first element in the
// high nibble. Double quantization stores absmax - mean as 8-bit codes in blocks of 256 with a float32
// absmax per block and the mean as a float32 offset.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "qlora/codebook.h"
#include "qlora/tile_order.h"
#include "qlora/vec_io.cuh"

namespace qlora {

// The block scales of a 4-bit tensor as the kernels read them: either absmax (plain) or qabsmax + absmax2 +
// code2 + offset (double-quantized) is non-null.
struct BlockScales {
  const float* absmax = nullptr;
  const uint8_t* qabsmax = nullptr;
  const float* absmax2 = nullptr;
  const float* code2 = nullptr;
  const float* offset = nullptr;
};

// Quantize: 16 elements a thread (two 16-byte loads of bf16/fp16, 8 packed bytes out); a block of
// blocksize elements is blocksize/16 consecutive threads, so the 256-thread CTA holds whole blocks. A CTA codes
// kQuantizeTiles tiles of kQuantizeThreads * kQuantizeElems elements, the later tiles' loads in flight while the
// first is coded.
constexpr int kQuantizeElems = 16;
constexpr int kQuantizeThreads = 256;
constexpr int kQuantizeTiles = 2;
constexpr int64_t kQuantizeCtaElems = int64_t{kQuantizeThreads} * kQuantizeElems * kQuantizeTiles;
// Dequantize: a unit is 4 packed bytes -> 8 elements (one 16-byte bf16 store); each thread loads
// kDequantizeUnits units and their scales before decoding any, so that several loads are in flight.
constexpr int kDequantizeElems = 8;
constexpr int kDequantizeThreads = 256;
constexpr int kDequantizeUnits = 4;
// The absmax mean: each CTA sums kMeanChunk values (8 consecutive per thread), then one CTA sums the chunks.
constexpr int kMeanThreads = 256;
constexpr int kMeanPerThread = 8;
constexpr int kMeanChunk = kMeanThreads * kMeanPerThread;

__device__ __forceinline__ uint32_t warp_max_over(uint32_t m, int lanes) {
  for (int offset = 1; offset < lanes; offset <<= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, offset));
  return m;
}

// Device copies of the code-search buckets and of the code values (codebook.h), which each CTA
// stages into shared memory.
static __constant__ BucketTable<kNF4Buckets> kNF4BucketsDevice = kNF4BucketTable;
static __constant__ BucketTable<kFP4Buckets> kFP4BucketsDevice = kFP4BucketTable;
static __constant__ FastBucketTable kNF4FastBucketsDevice = kNF4FastBucketTable;
static __constant__ float kNF4ValuesDevice[16] = QLORA_NF4_VALUES;
static __constant__ float kFP4ValuesDevice[16] = QLORA_FP4_VALUES;
// The 16 code values of a quant type.
template <QuantType QT>
__device__ __forceinline__ const float* code_values() {
  return QT == QuantType::NF4 ? kNF4ValuesDevice : kFP4ValuesDevice;
}
// Code (lane % 16)'s value, which a shuffle from that lane hands any thread of the warp.
template <QuantType QT>
__device__ __forceinline__ float lane_code_value() {
  return code_values<QT>()[threadIdx.x % 16];
}

template <QuantType QT>
__device__ __forceinline__ void stage_buckets(Bucket* smem) {
  constexpr int count = QT == QuantType::NF4 ? kNF4Buckets : kFP4Buckets;
  if (threadIdx.x < count)
    smem[threadIdx.x] = QT == QuantType::NF4 ? kNF4BucketsDevice.bucket[threadIdx.x] : kFP4BucketsDevice.bucket[threadIdx.x];
}

// The CTA's tiles from element first on; kWhole: they lie wholly below n, so no element needs a bounds check and
// the tiles' code is one straight run, which lets the scheduler interleave their table lookups.
template <bool kWhole, typename T, QuantType QT>
__device__ __forceinline__ void quantize_tiles(const T* __restrict__ A, uint8_t* __restrict__ packed,
                                               float* __restrict__ absmax, int64_t n, int log2_blocksize, int64_t first,
                                               const Bucket* buckets, const FastBucket* fast_buckets, uint32_t* warp_max) {
  auto first_element = [&](int t) { return first + (static_cast<int64_t>(t) * kQuantizeThreads + threadIdx.x) * kQuantizeElems; };
  typename VecIO<T>::Raw8 raw[kQuantizeTiles][kQuantizeElems / 8];
#pragma unroll
  for (int t = 0; t < kQuantizeTiles; ++t) {
    if (kWhole || first_element(t) + kQuantizeElems <= n) {
#pragma unroll
      for (int h = 0; h < kQuantizeElems / 8; ++h) raw[t][h] = VecIO<T>::load_raw8(A + first_element(t) + 8 * h);
    }
  }
  // Publishes the staged buckets. No loaded register is read before it, so the loads stay in flight across it
  // and each warp goes on as soon as its own data arrives.
  __syncthreads();
  const int group_threads = (1 << log2_blocksize) / kQuantizeElems;
#pragma unroll
  for (int t = 0; t < kQuantizeTiles; ++t) {
    const int64_t e0 = first_element(t);
    float v[kQuantizeElems];
    if (kWhole || e0 + kQuantizeElems <= n) {
#pragma unroll
      for (int h = 0; h < kQuantizeElems / 8; ++h) VecIO<T>::unpack8(raw[t][h], v + 8 * h);
    } else {
#pragma unroll
      for (int i = 0; i < kQuantizeElems; ++i) v[i] = e0 + i < n ? VecIO<T>::to_float(A[e0 + i]) : 0.0f;
    }
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < kQuantizeElems; ++i) m = max(m, abs_bits(v[i]));
    m = warp_max_over(m, min(group_threads, 32));
    if (group_threads > 32) {  // a block spans warps (the same branch in every thread of the CTA)
      const int warp = threadIdx.x / 32, group_warps = group_threads / 32;
      if (threadIdx.x % 32 == 0) warp_max[warp] = m;
      __syncthreads();
      const int first_warp = warp / group_warps * group_warps;
      for (int w = first_warp; w < first_warp + group_warps; ++w) m = max(m, warp_max[w]);
      __syncthreads();  // read before the next tile writes
    }
    const float block_absmax = bits_float(m);
    const float inv = inverse_scale(block_absmax);

    uint32_t words[2] = {0, 0};
    if (QT == QuantType::NF4 && finite_scale(block_absmax, inv)) {
      // Codes as exact floats, packed by fused multiply-adds: four codes make a 16-bit value, whose bits the
      // rounding bias exposes, and a byte permute joins two of them into a word.
      constexpr float kRoundingBias = 12582912.0f;
#pragma unroll
      for (int w = 0; w < 2; ++w) {
        uint32_t halves[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float* e = v + 8 * w + 4 * h;
          const float byte0 = fmaf(nf4_code_finite(e[0] * inv, fast_buckets), 16.0f,
                                   nf4_code_finite(e[1] * inv, fast_buckets));
          const float byte1 = fmaf(nf4_code_finite(e[2] * inv, fast_buckets), 16.0f,
                                   nf4_code_finite(e[3] * inv, fast_buckets));
          halves[h] = float_bits(fmaf(byte1, 256.0f, byte0) + kRoundingBias);
        }
        words[w] = __byte_perm(halves[0], halves[1], 0x5410);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kQuantizeElems / 2; ++j) {
        const uint32_t hi = code_4bit<QT>(v[2 * j] * inv, buckets);
        const uint32_t lo = code_4bit<QT>(v[2 * j + 1] * inv, buckets);
        words[j / 4] |= ((hi << 4) | lo) << (8 * (j % 4));
      }
    }
    if (kWhole || e0 + kQuantizeElems <= n) {
      *reinterpret_cast<uint2*>(packed + e0 / 2) = make_uint2(words[0], words[1]);
    } else if (e0 < n) {
      const int64_t bytes = (n - e0 + 1) / 2;
#pragma unroll
      for (int j = 0; j < kQuantizeElems / 2; ++j)
        if (j < bytes) packed[e0 / 2 + j] = static_cast<uint8_t>(words[j / 4] >> (8 * (j % 4)));
    }
    if ((kWhole || e0 < n) && (threadIdx.x & (group_threads - 1)) == 0) absmax[e0 >> log2_blocksize] = block_absmax;
  }
}

template <typename T, QuantType QT>
__global__ void __launch_bounds__(kQuantizeThreads, 4) quantize_4bit_kernel(const T* __restrict__ A, uint8_t* __restrict__ packed,
                                                                          float* __restrict__ absmax, int64_t n,
                                                                          int log2_blocksize) {
  __shared__ uint32_t warp_max[kQuantizeThreads / 32];
  __shared__ Bucket buckets[kNF4Buckets];
  __shared__ FastBucket fast_buckets[kNF4FastBuckets];
  stage_buckets<QT>(buckets);
  if (QT == QuantType::NF4 && threadIdx.x < kNF4FastBuckets) fast_buckets[threadIdx.x] = kNF4FastBucketsDevice.bucket[threadIdx.x];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kQuantizeCtaElems;
  if (first + kQuantizeCtaElems <= n)
    quantize_tiles<true, T, QT>(A, packed, absmax, n, log2_blocksize, first, buckets, fast_buckets, warp_max);
  else
    quantize_tiles<false, T, QT>(A, packed, absmax, n, log2_blocksize, first, buckets, fast_buckets, warp_max);
}

// Fixed-order sums (the CPU implementation repeats this order exactly, so both give the same bits).
__device__ __forceinline__ double block_sum_fixed_order(double acc, double* smem) {
  smem[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kMeanThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) smem[threadIdx.x] += smem[threadIdx.x + stride];
    __syncthreads();
  }
  return smem[0];
}

// Pass 1 of the mean: one double per chunk of kMeanChunk absmax values. Given a code_table, CTA 0 also builds the
// search table of the 8-bit code for pass 3 (code_8bit_table), with whether the code fits it in the entry after
// it: the first CTA, so that the other CTAs' sums hide the build (the last one left it on the kernel's tail).
static __global__ void __launch_bounds__(kMeanThreads) absmax_partial_sums_kernel(const float* __restrict__ absmax,
                                                                                   double* __restrict__ partial,
                                                                                   int64_t n, const float* __restrict__ code,
                                                                                   uint32_t* __restrict__ code_table) {
  static_assert(kMeanThreads == 256, "one code value and one threshold key a thread");
  __shared__ double smem[kMeanThreads];
  const bool builds_table = code_table != nullptr && blockIdx.x == 0;
  const float code_value = builds_table ? code[threadIdx.x] : 0.0f;  // loaded beside the sums' loads
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kMeanChunk + threadIdx.x * kMeanPerThread;
  double acc = 0.0;
#pragma unroll
  for (int j = 0; j < kMeanPerThread; ++j)
    if (first + j < n) acc += static_cast<double>(absmax[first + j]);
  const double total = block_sum_fixed_order(acc, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
  if (!builds_table) return;
  __shared__ float code_s[256];
  __shared__ int32_t keys[256];
  code_s[threadIdx.x] = code_value;
  __syncthreads();
  bool fits = code_key(code_s, threadIdx.x, keys);
  __syncthreads();
  // Unrolled, so that a thread's independent searches overlap their shared-memory latencies.
  constexpr int kEntriesPerThread = (kCodeTableSize + kMeanThreads - 1) / kMeanThreads;
#pragma unroll
  for (int e = 0; e < kEntriesPerThread; ++e) {
    const int j = threadIdx.x + e * kMeanThreads;
    if (j < kCodeTableSize) code_table[j] = code_table_entry(keys, j, &fits);
  }
  fits = __syncthreads_and(fits) != 0;
  if (threadIdx.x == 0) code_table[kCodeTableSize] = fits ? 1u : 0u;
}

// Pass 2: one CTA adds the chunk sums and writes the mean as float32.
static __global__ void __launch_bounds__(kMeanThreads) absmax_mean_kernel(const double* __restrict__ partial,
                                                                           int64_t num_partials, int64_t n,
                                                                           float* __restrict__ offset) {
  __shared__ double smem[kMeanThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += kMeanThreads) acc += partial[i];
  const double total = block_sum_fixed_order(acc, smem);
  if (threadIdx.x == 0) *offset = static_cast<float>(total / static_cast<double>(n));
}

// Pass 3: one warp per block of 256 absmax values (8 a lane) at a time: absmax - mean as 8-bit codes and the
// block's scale. A warp needs no barrier after the staging, and each lane's 8 code searches are independent.
// The CTAs stride over the blocks, so each stages the code and its search table once; the table search gives
// exactly the binary search's codes, which remains for a code that does not fit the table and where no table
// was built (code_table nullptr).
constexpr int kDoubleQuantizeWarps = 8;
constexpr int kDoubleQuantizeCtasPerSm = 4;

static __global__ void __launch_bounds__(kDoubleQuantizeWarps * 32) double_quantize_kernel(
    const float* __restrict__ absmax, const float* __restrict__ offset, const float* __restrict__ code,
    const uint32_t* __restrict__ code_table, uint8_t* __restrict__ qabsmax, float* __restrict__ absmax2, int64_t n) {
  constexpr int kPerLane = kAbsmaxBlocksize / 32;
  __shared__ float smem_code[256];
  __shared__ uint32_t smem_table[kCodeTableSize];
  const bool table_fits = code_table != nullptr && code_table[kCodeTableSize] != 0;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) smem_code[i] = code[i];
  if (table_fits)
    for (int i = threadIdx.x; i < kCodeTableSize; i += blockDim.x) smem_table[i] = code_table[i];
  __syncthreads();
  const float mean = *offset;
  const int64_t blocks = (n + kAbsmaxBlocksize - 1) / kAbsmaxBlocksize;
  for (int64_t block = static_cast<int64_t>(blockIdx.x) * kDoubleQuantizeWarps + threadIdx.x / 32; block < blocks;
       block += static_cast<int64_t>(gridDim.x) * kDoubleQuantizeWarps) {  // the same trip count in all 32 lanes
    const int64_t first = block * kAbsmaxBlocksize + (threadIdx.x % 32) * kPerLane;
    float centered[kPerLane];
    if (first + kPerLane <= n) {
      const float4 lo = *reinterpret_cast<const float4*>(absmax + first);
      const float4 hi = *reinterpret_cast<const float4*>(absmax + first + 4);
      const float raw[kPerLane] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) centered[i] = raw[i] - mean;
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) centered[i] = first + i < n ? absmax[first + i] - mean : 0.0f;
    }
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) m = max(m, abs_bits(centered[i]));
    m = warp_max_over(m, 32);
    const float scale = bits_float(m);
    const float inv = inverse_scale(scale);
    uint32_t q[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      q[i] = table_fits ? code_8bit_table(smem_table, centered[i] * inv) : code_8bit(smem_code, centered[i] * inv);
    if (first + kPerLane <= n) {
      *reinterpret_cast<uint2*>(qabsmax + first) =
          make_uint2(q[0] | q[1] << 8 | q[2] << 16 | q[3] << 24, q[4] | q[5] << 8 | q[6] << 16 | q[7] << 24);
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (first + i < n) qabsmax[first + i] = static_cast<uint8_t>(q[i]);
    }
    if (threadIdx.x % 32 == 0) absmax2[block] = scale;
  }
}

// Tile order (qlora/tile_order.h): word q (0..127) of a tile's 64-k block belongs to lane q / 4 = 4g + t and holds its
// entries 4c .. 4c + 3 (c = q % 2) of row 8h + g (h = q / 2 % 2), bytes 4e + t of the block's row. The four lanes t of a
// quad hold a 4 x 4 byte matrix M[t][e]; after its transpose, lane t holds bytes 16c + 4t .. + 3 of the row, 8
// consecutive codes as a row-major word holds them. Two shuffles: the 2 x 2 blocks of halfwords swap across t ^ 2,
// then the bytes inside each block across t ^ 1. kStride: how many lanes apart t and t + 1 are (4 where a thread
// holds one word, 1 where a lane holds its own words).
template <int kStride = 4>
__device__ __forceinline__ uint32_t tile_order_quad_transpose(uint32_t word, int t) {
  uint32_t other = __shfl_xor_sync(0xffffffffu, word, 2 * kStride);
  word = __byte_perm(word, other, t < 2 ? 0x5410u : 0x3276u);
  other = __shfl_xor_sync(0xffffffffu, word, kStride);
  return __byte_perm(word, other, t % 2 == 0 ? 0x6240u : 0x3715u);
}
// Tile order: a CTA takes kTileDequantizeBlocks 64-k blocks of one 16-row tile (grid: block ranges x tiles), so that
// every unit's row and column come from its thread's place in the CTA, without a division.
// From tile order a thread takes 8 units: 56 registers, 4 CTAs an SM, 8192x28672 154.2 us against 161.2 with 4 units
// (tools/dequant_occupancy.cu, H200); from row-major bytes 2 to 12 units read within 1 %.
constexpr int kTileDequantizeUnits = 8;
constexpr int tile_dequantize_blocks(int units) { return kDequantizeThreads * units / (kTileOrderBytes / 4); }
constexpr int kTileDequantizeBlocks = tile_dequantize_blocks(kTileDequantizeUnits);

// kDoubleQuant: absmax is nullptr and qabsmax, absmax2, code2, offset describe the scales (a template
// argument rather than a run-time test, so each kernel carries only its own loads). kTileOrder: packed is in tile
// order for rows of K elements (see kTileDequantizeBlocks; a warp's words lie in one block of one tile).
template <typename T, QuantType QT, bool kDoubleQuant, bool kTileOrder = false, int kMinCtas = 1,
          int kUnits = kTileOrder ? kTileDequantizeUnits : kDequantizeUnits>
__global__ void __launch_bounds__(kDequantizeThreads, kMinCtas) dequantize_4bit_kernel(
    const uint8_t* __restrict__ packed, const float* __restrict__ absmax, const uint8_t* __restrict__ qabsmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ offset,
    T* __restrict__ out, int64_t n, int log2_blocksize, int64_t K = 0) {
  // Code c is read from lane c by a shuffle. A shuffle uses only the low five bits of its lane argument and
  // lanes 16-31 repeat lanes 0-15, so a code's nibble needs no masking: one instruction per element.
  const float lane_value = lane_code_value<QT>();
  __shared__ float smem_code2[256];
  constexpr bool double_quant = kDoubleQuant;
  const int64_t num_bytes = (n + 1) / 2;
  const int64_t num_units = (n + kDequantizeElems - 1) / kDequantizeElems;
  // One tile per CTA: the hardware hands tiles to SMs as they free up, which balances the work better than
  // persistent CTAs striding over a fixed share.
  const int64_t first_unit = static_cast<int64_t>(blockIdx.x) * kDequantizeThreads * kUnits;
  constexpr int kTileWords = kTileOrderBytes / 4;
  const int tq = threadIdx.x % kTileWords;
  const int64_t tile_blocks = kTileOrder ? K / kTileOrderK : 0;
  const int64_t tile_block0 = static_cast<int64_t>(blockIdx.x) * tile_dequantize_blocks(kUnits) + threadIdx.x / kTileWords;
  const int64_t tile_word0 = (blockIdx.y * tile_blocks + tile_block0) * kTileWords + tq;
  const int64_t tile_e00 = (static_cast<int64_t>(blockIdx.y) * kTileOrderRows + 8 * (tq / 2 % 2) + tq / 16) * K +
                           tile_block0 * kTileOrderK + 32 * (tq % 2) + 8 * (tq / 4 % 4);
  // Unit u of this thread: the packed word it reads, the first of the 8 elements it writes, whether it exists.
  struct Unit {
    int64_t word, e0;
    bool ok;
  };
  const auto unit_at = [&](int u) -> Unit {
    if constexpr (kTileOrder) {
      return {tile_word0 + 2 * u * kTileWords, tile_e00 + 2 * u * kTileOrderK, tile_block0 + 2 * u < tile_blocks};
    } else {
      const int64_t unit = first_unit + u * kDequantizeThreads + threadIdx.x;
      return {unit, unit * kDequantizeElems, unit < num_units};
    }
  };
  uint32_t words[kUnits];
  float scales[kUnits];  // plain absmax, or absmax2 of the unit's block when double-quantized
  uint32_t qcodes[kUnits];
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {
    const Unit unit = unit_at(u);
    const int64_t b0 = unit.word * 4;
    words[u] = 0;
    scales[u] = 0.0f;
    qcodes[u] = 0;
    if (!unit.ok) continue;
    if (kTileOrder || b0 + 4 <= num_bytes) {  // tile order: whole words
      words[u] = __ldg(reinterpret_cast<const uint32_t*>(packed + b0));
    } else {
      for (int j = 0; j < 4 && b0 + j < num_bytes; ++j) words[u] |= static_cast<uint32_t>(packed[b0 + j]) << (8 * j);
    }
    const int64_t block = unit.e0 >> log2_blocksize;
    if constexpr (double_quant) {
      qcodes[u] = __ldg(qabsmax + block);
      scales[u] = __ldg(absmax2 + block / kAbsmaxBlocksize);
    } else {
      scales[u] = __ldg(absmax + block);
    }
  }
  // Staged after the weight loads are issued, so the barrier overlaps their latency; the mean is loaded before the
  // barrier, where after it its own round trip had followed the weights'.
  const float mean = double_quant ? *offset : 0.0f;
  if constexpr (double_quant) {
    for (int i = threadIdx.x; i < 256; i += kDequantizeThreads) smem_code2[i] = code2[i];
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {
    const Unit unit = unit_at(u);
    if (kTileOrder && !unit.ok) continue;  // the whole warp
    const int64_t e0 = unit.e0;
    if constexpr (kTileOrder) words[u] = tile_order_quad_transpose(words[u], threadIdx.x / 4 % 4);
    // code2[q] * absmax2 + mean, rounded twice as bitsandbytes does.
    const float scale = double_quant ? mul_then_add(smem_code2[qcodes[u]], scales[u], mean) : scales[u];
    float v[kDequantizeElems];
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // every lane shuffles, also past the end, so that all 32 take part
      v[2 * j] = __shfl_sync(0xffffffffu, lane_value, static_cast<int>(words[u] >> (8 * j + 4))) * scale;
      v[2 * j + 1] = __shfl_sync(0xffffffffu, lane_value, static_cast<int>(words[u] >> (8 * j))) * scale;
    }
    if (e0 + kDequantizeElems <= n) {
      VecIO<T>::store8(out + e0, v);
    } else {
#pragma unroll
      for (int i = 0; i < kDequantizeElems; ++i)  // constant indices keep v in registers
        if (e0 + i < n) out[e0 + i] = VecIO<T>::from_float(v[i]);
    }
  }
}

inline int log2_exact(int64_t x) {
  int k = 0;
  while ((int64_t{1} << k) < x) ++k;
  return k;
}

// ---- launchers -----------------------------------------------------------------------------------------

template <typename T>
cudaError_t launch_quantize_4bit(const T* A, uint8_t* packed, float* absmax, int64_t n, int64_t blocksize,
                                 QuantType quant_type, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t grid = (n + kQuantizeCtaElems - 1) / kQuantizeCtaElems;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int log2_blocksize = log2_exact(blocksize);
  if (quant_type == QuantType::NF4) {
    quantize_4bit_kernel<T, QuantType::NF4><<<static_cast<unsigned>(grid), kQuantizeThreads, 0, stream>>>(A, packed, absmax, n, log2_blocksize);
  } else {
    quantize_4bit_kernel<T, QuantType::FP4><<<static_cast<unsigned>(grid), kQuantizeThreads, 0, stream>>>(A, packed, absmax, n, log2_blocksize);
  }
  return cudaGetLastError();
}

inline int64_t absmax_num_partials(int64_t n) { return (n + kMeanChunk - 1) / kMeanChunk; }

// Bytes of scratch launch_double_quantize needs (8-byte aligned): the chunk sums of the mean, then the code's
// search table and its fits flag.
inline int64_t double_quantize_scratch_bytes(int64_t n) {
  return absmax_num_partials(n) * static_cast<int64_t>(sizeof(double)) + (kCodeTableSize + 1) * 4;
}

inline cudaError_t launch_double_quantize(const float* absmax, const float* code, uint8_t* qabsmax, float* absmax2,
                                          float* offset, void* scratch, int64_t n, int num_sms, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t num_partials = absmax_num_partials(n);
  const int64_t blocks = (n + kAbsmaxBlocksize - 1) / kAbsmaxBlocksize;
  const int64_t ctas_wanted = (blocks + kDoubleQuantizeWarps - 1) / kDoubleQuantizeWarps;
  const int64_t ctas = std::min<int64_t>(ctas_wanted, static_cast<int64_t>(num_sms) * kDoubleQuantizeCtasPerSm);
  double* partial = static_cast<double*>(scratch);
  // The table pays where the grid strides, each CTA searching several blocks: in one pass of the grid, building it
  // costs more than the binary search it saves.
  uint32_t* code_table = ctas < ctas_wanted ? reinterpret_cast<uint32_t*>(partial + num_partials) : nullptr;
  absmax_partial_sums_kernel<<<static_cast<unsigned>(num_partials), kMeanThreads, 0, stream>>>(absmax, partial, n, code,
                                                                                               code_table);
  absmax_mean_kernel<<<1, kMeanThreads, 0, stream>>>(partial, num_partials, n, offset);
  double_quantize_kernel<<<static_cast<unsigned>(ctas), kDoubleQuantizeWarps * 32, 0, stream>>>(
      absmax, offset, code, code_table, qabsmax, absmax2, n);
  return cudaGetLastError();
}

template <typename T, QuantType QT, bool kTileOrder>
cudaError_t launch_dequantize_4bit_as(const uint8_t* packed, const BlockScales& s, T* out, int64_t n,
                                      int64_t blocksize, int64_t K, cudaStream_t stream) {
  const int64_t per_cta = static_cast<int64_t>(kDequantizeThreads) * kDequantizeUnits * kDequantizeElems;
  const int64_t tiles = kTileOrder ? n / K / kTileOrderRows : 1;
  const int64_t ranges = kTileOrder ? (K / kTileOrderK + kTileDequantizeBlocks - 1) / kTileDequantizeBlocks : 0;
  const int64_t grid_x = kTileOrder ? ranges : (n + per_cta - 1) / per_cta;
  if (grid_x > 0x7fffffff || tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(tiles));
  if (s.absmax == nullptr) {
    dequantize_4bit_kernel<T, QT, true, kTileOrder><<<grid, kDequantizeThreads, 0, stream>>>(
        packed, s.absmax, s.qabsmax, s.absmax2, s.code2, s.offset, out, n, log2_exact(blocksize), K);
  } else {
    dequantize_4bit_kernel<T, QT, false, kTileOrder><<<grid, kDequantizeThreads, 0, stream>>>(
        packed, s.absmax, s.qabsmax, s.absmax2, s.code2, s.offset, out, n, log2_exact(blocksize), K);
  }
  return cudaGetLastError();
}

// tile_order_K > 0: packed is a tile-ordered weight [n / K, K] (qlora/tile_order.h); 0: row-major bytes.
template <typename T>
cudaError_t launch_dequantize_4bit(const uint8_t* packed, const BlockScales& scales, T* out, int64_t n,
                                   int64_t blocksize, QuantType quant_type, cudaStream_t stream,
                                   int64_t tile_order_K = 0) {
  if (n == 0) return cudaSuccess;
  const int64_t K = tile_order_K;
  if (K > 0) {
    if (n % K != 0 || !tile_order_supported(n / K, K)) return cudaErrorInvalidValue;
    return quant_type == QuantType::NF4
               ? launch_dequantize_4bit_as<T, QuantType::NF4, true>(packed, scales, out, n, blocksize, K, stream)
               : launch_dequantize_4bit_as<T, QuantType::FP4, true>(packed, scales, out, n, blocksize, K, stream);
  }
  return quant_type == QuantType::NF4
             ? launch_dequantize_4bit_as<T, QuantType::NF4, false>(packed, scales, out, n, blocksize, 0, stream)
             : launch_dequantize_4bit_as<T, QuantType::FP4, false>(packed, scales, out, n, blocksize, 0, stream);
}

}  // namespace qlora
