// Blockwise 4-bit quantization (NF4, FP4), double quantization of the absmax, and dequantization.
// Torch-free: raw pointers and a stream in, cudaError_t out. Layout (bitsandbytes-compatible): blocks of
// `blocksize` consecutive elements, one float32 absmax per block, two codes per byte, first element in the
// high nibble. Double quantization stores absmax - mean as 8-bit codes in blocks of 256 with a float32
// absmax per block and the mean as a float32 offset.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "qlora/codebook.h"

namespace qlora {

// Elements one thread quantizes or dequantizes per step: 16 bytes of bf16/fp16 in, 4 packed bytes out.
constexpr int kElemsPerThread = 8;
constexpr int kQuantizeThreads = 256;
constexpr int kDequantizeThreads = 256;
// Each dequantize thread handles this many 8-element units, loaded before any is used, so that
// several loads are in flight per thread.
constexpr int kDequantizeUnits = 4;
// Absmax values summed by one block of the mean's first pass (kMeanThreads threads, strided).
constexpr int kMeanThreads = 256;
constexpr int kMeanChunk = kMeanThreads * 32;

template <typename T> struct VecIO;

template <> struct VecIO<float> {
  __device__ static void load8(const float* p, float v[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
  __device__ static void store8(float* p, const float v[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
  __device__ static float to_float(float x) { return x; }
  __device__ static float from_float(float x) { return x; }
};

template <> struct VecIO<__nv_bfloat16> {
  __device__ static void load8(const __nv_bfloat16* p, float v[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
  __device__ static void store8(__nv_bfloat16* p, const float v[8]) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <> struct VecIO<__half> {
  __device__ static void load8(const __half* p, float v[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
  __device__ static void store8(__half* p, const float v[8]) {
    uint4 raw;
    __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
};

__device__ __forceinline__ uint32_t warp_max_over(uint32_t m, int lanes) {
  for (int offset = 1; offset < lanes; offset <<= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, offset));
  return m;
}

// One thread per 8 consecutive elements; the blocksize/8 threads of a quantization block reduce their
// absmax with shuffles (and through shared memory when the block spans several warps).
// THREADS: the CTA size, at least blocksize/8 so that a block never straddles two CTAs.
template <typename T, QuantType QT, int THREADS>
__global__ void __launch_bounds__(THREADS) quantize_4bit_kernel(const T* __restrict__ A, uint8_t* __restrict__ packed,
                                                                 float* __restrict__ absmax, int64_t n, int log2_blocksize) {
  __shared__ uint32_t warp_max[THREADS / 32];
  const int64_t e0 = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) * kElemsPerThread;
  float v[kElemsPerThread];
  if (e0 + kElemsPerThread <= n) {
    VecIO<T>::load8(A + e0, v);
  } else {
#pragma unroll
    for (int i = 0; i < kElemsPerThread; ++i) v[i] = e0 + i < n ? VecIO<T>::to_float(A[e0 + i]) : 0.0f;
  }
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < kElemsPerThread; ++i) m = max(m, abs_bits(v[i]));

  const int group_threads = (1 << log2_blocksize) / kElemsPerThread;
  m = warp_max_over(m, min(group_threads, 32));
  if (group_threads > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) warp_max[warp] = m;
    __syncthreads();
    const int group_warps = group_threads / 32;
    const int first = warp / group_warps * group_warps;
    for (int w = first; w < first + group_warps; ++w) m = max(m, warp_max[w]);
  }
  const float block_absmax = bits_float(m);
  const float inv = inverse_scale(block_absmax);

  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < kElemsPerThread / 2; ++j) {
    const uint32_t hi = code_4bit<QT>(v[2 * j] * inv);
    const uint32_t lo = code_4bit<QT>(v[2 * j + 1] * inv);
    word |= ((hi << 4) | lo) << (8 * j);
  }
  if (e0 + kElemsPerThread <= n) {
    *reinterpret_cast<uint32_t*>(packed + e0 / 2) = word;
  } else if (e0 < n) {
    const int64_t bytes = (n - e0 + 1) / 2;
    for (int j = 0; j < bytes; ++j) packed[e0 / 2 + j] = static_cast<uint8_t>(word >> (8 * j));
  }
  if (e0 < n && (threadIdx.x & (group_threads - 1)) == 0) absmax[e0 >> log2_blocksize] = block_absmax;
}

// Fixed-order sums (the CPU implementation repeats this order exactly, so both give the same bits).
__device__ __forceinline__ double block_sum_fixed_order(double acc, double* smem) {
  smem[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kMeanThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) smem[threadIdx.x] += smem[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = smem[0];
  __syncthreads();
  return total;
}

// static: non-template kernels defined in a header would otherwise collide between translation units.
static __global__ void __launch_bounds__(kMeanThreads) absmax_partial_sums_kernel(const float* __restrict__ absmax,
                                                                            double* __restrict__ partial, int64_t n) {
  __shared__ double smem[kMeanThreads];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kMeanChunk;
  double acc = 0.0;
  for (int j = 0; j < kMeanChunk / kMeanThreads; ++j) {
    const int64_t i = base + j * kMeanThreads + threadIdx.x;
    if (i < n) acc += static_cast<double>(absmax[i]);
  }
  const double total = block_sum_fixed_order(acc, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// One CTA per block of 256 absmax values. Every CTA sums the partial sums itself (in the same fixed
// order), which costs a few hundred loads and saves a launch and a grid-wide dependency.
static __global__ void __launch_bounds__(kAbsmaxBlocksize) double_quantize_kernel(
    const float* __restrict__ absmax, const double* __restrict__ partial, int64_t num_partials,
    const float* __restrict__ code, uint8_t* __restrict__ qabsmax, float* __restrict__ absmax2,
    float* __restrict__ offset_out, int64_t n) {
  static_assert(kAbsmaxBlocksize == kMeanThreads, "one thread per absmax in the second pass");
  __shared__ double smem[kMeanThreads];
  __shared__ float smem_code[256];
  __shared__ uint32_t warp_max[kAbsmaxBlocksize / 32];
  smem_code[threadIdx.x] = code[threadIdx.x];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += kMeanThreads) acc += partial[i];
  const float offset = static_cast<float>(block_sum_fixed_order(acc, smem) / static_cast<double>(n));

  const int64_t i = static_cast<int64_t>(blockIdx.x) * kAbsmaxBlocksize + threadIdx.x;
  const float centered = i < n ? absmax[i] - offset : 0.0f;
  const uint32_t m = warp_max_over(abs_bits(centered), 32);
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  uint32_t block_max = 0;
#pragma unroll
  for (int w = 0; w < kAbsmaxBlocksize / 32; ++w) block_max = max(block_max, warp_max[w]);
  const float scale = bits_float(block_max);
  if (i < n) qabsmax[i] = static_cast<uint8_t>(code_8bit(smem_code, centered * inverse_scale(scale)));
  if (threadIdx.x == 0) {
    absmax2[blockIdx.x] = scale;
    if (blockIdx.x == 0) *offset_out = offset;
  }
}

// Absmax of block `b`, plain or double-quantized (code2[q] * absmax2 + offset, rounded as bitsandbytes does).
struct AbsmaxReader {
  const float* absmax;     // plain absmax, or nullptr when double-quantized
  const uint8_t* qabsmax;  // 8-bit codes of absmax - offset
  const float* absmax2;    // one per 256 codes
  const float* code2;      // 256-entry second-level code, staged in shared memory by the kernel
  float offset;
  __device__ __forceinline__ float operator()(int64_t b) const {
    if (absmax != nullptr) return __ldg(absmax + b);
    return mul_then_add(code2[__ldg(qabsmax + b)], __ldg(absmax2 + b / kAbsmaxBlocksize), offset);
  }
};

template <typename T, QuantType QT>
__global__ void __launch_bounds__(kDequantizeThreads) dequantize_4bit_kernel(
    const uint8_t* __restrict__ packed, const float* __restrict__ absmax, const uint8_t* __restrict__ qabsmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ offset,
    T* __restrict__ out, int64_t n, int log2_blocksize) {
  // Both values of every byte, so one shared-memory load decodes two elements.
  __shared__ float2 pair_lut[256];
  __shared__ float smem_code2[256];
  {
    constexpr float values_nf4[16] = QLORA_NF4_VALUES;
    constexpr float values_fp4[16] = QLORA_FP4_VALUES;
    float values[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) values[i] = QT == QuantType::NF4 ? values_nf4[i] : values_fp4[i];
    for (int byte = threadIdx.x; byte < 256; byte += kDequantizeThreads) {
      float hi = 0.0f, lo = 0.0f;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        hi = (byte >> 4) == i ? values[i] : hi;
        lo = (byte & 15) == i ? values[i] : lo;
      }
      pair_lut[byte] = make_float2(hi, lo);
      if (code2 != nullptr) smem_code2[byte] = code2[byte];
    }
  }
  __syncthreads();
  const AbsmaxReader read_absmax{absmax, qabsmax, absmax2, smem_code2, offset != nullptr ? *offset : 0.0f};
  const int64_t num_bytes = (n + 1) / 2;
  const int64_t first_unit = static_cast<int64_t>(blockIdx.x) * kDequantizeThreads * kDequantizeUnits;
  uint32_t words[kDequantizeUnits];
#pragma unroll
  for (int u = 0; u < kDequantizeUnits; ++u) {
    const int64_t b0 = (first_unit + u * kDequantizeThreads + threadIdx.x) * 4;
    words[u] = 0;
    if (b0 + 4 <= num_bytes) {
      words[u] = __ldg(reinterpret_cast<const uint32_t*>(packed + b0));
    } else {
      for (int j = 0; j < 4 && b0 + j < num_bytes; ++j) words[u] |= static_cast<uint32_t>(packed[b0 + j]) << (8 * j);
    }
  }
#pragma unroll
  for (int u = 0; u < kDequantizeUnits; ++u) {
    const int64_t e0 = (first_unit + u * kDequantizeThreads + threadIdx.x) * kElemsPerThread;
    if (e0 >= n) break;
    const float scale = read_absmax(e0 >> log2_blocksize);
    float v[kElemsPerThread];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 pair = pair_lut[(words[u] >> (8 * j)) & 0xffu];
      v[2 * j] = pair.x * scale;
      v[2 * j + 1] = pair.y * scale;
    }
    if (e0 + kElemsPerThread <= n) {
      VecIO<T>::store8(out + e0, v);
    } else {
      for (int i = 0; e0 + i < n; ++i) out[e0 + i] = VecIO<T>::from_float(v[i]);
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
  const int log2_blocksize = log2_exact(blocksize);
  const bool wide = blocksize / kElemsPerThread > kQuantizeThreads;  // only blocksize 4096
  const int threads = wide ? 2 * kQuantizeThreads : kQuantizeThreads;
  const int64_t grid = (n + static_cast<int64_t>(threads) * kElemsPerThread - 1) / (threads * kElemsPerThread);
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 g(static_cast<unsigned>(grid));
  if (quant_type == QuantType::NF4) {
    if (wide) quantize_4bit_kernel<T, QuantType::NF4, 2 * kQuantizeThreads><<<g, threads, 0, stream>>>(A, packed, absmax, n, log2_blocksize);
    else quantize_4bit_kernel<T, QuantType::NF4, kQuantizeThreads><<<g, threads, 0, stream>>>(A, packed, absmax, n, log2_blocksize);
  } else {
    if (wide) quantize_4bit_kernel<T, QuantType::FP4, 2 * kQuantizeThreads><<<g, threads, 0, stream>>>(A, packed, absmax, n, log2_blocksize);
    else quantize_4bit_kernel<T, QuantType::FP4, kQuantizeThreads><<<g, threads, 0, stream>>>(A, packed, absmax, n, log2_blocksize);
  }
  return cudaGetLastError();
}

inline int64_t absmax_num_partials(int64_t n) { return (n + kMeanChunk - 1) / kMeanChunk; }

// partial: scratch of absmax_num_partials(n) doubles.
inline cudaError_t launch_double_quantize(const float* absmax, const float* code, uint8_t* qabsmax, float* absmax2,
                                          float* offset, double* partial, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t num_partials = absmax_num_partials(n);
  absmax_partial_sums_kernel<<<static_cast<unsigned>(num_partials), kMeanThreads, 0, stream>>>(absmax, partial, n);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t blocks = (n + kAbsmaxBlocksize - 1) / kAbsmaxBlocksize;
  double_quantize_kernel<<<static_cast<unsigned>(blocks), kAbsmaxBlocksize, 0, stream>>>(
      absmax, partial, num_partials, code, qabsmax, absmax2, offset, n);
  return cudaGetLastError();
}

// Either absmax (plain) or qabsmax + absmax2 + code2 + offset (double-quantized) is non-null.
template <typename T>
cudaError_t launch_dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                                   const float* absmax2, const float* code2, const float* offset, T* out, int64_t n,
                                   int64_t blocksize, QuantType quant_type, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t per_cta = static_cast<int64_t>(kDequantizeThreads) * kDequantizeUnits * kElemsPerThread;
  const int64_t grid = (n + per_cta - 1) / per_cta;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int log2_blocksize = log2_exact(blocksize);
  if (quant_type == QuantType::NF4) {
    dequantize_4bit_kernel<T, QuantType::NF4><<<static_cast<unsigned>(grid), kDequantizeThreads, 0, stream>>>(
        packed, absmax, qabsmax, absmax2, code2, offset, out, n, log2_blocksize);
  } else {
    dequantize_4bit_kernel<T, QuantType::FP4><<<static_cast<unsigned>(grid), kDequantizeThreads, 0, stream>>>(
        packed, absmax, qabsmax, absmax2, code2, offset, out, n, log2_blocksize);
  }
  return cudaGetLastError();
}

}  // namespace qlora
