// 16-bit pairs in 32-bit registers for the matmul kernels (lora_linear_4bit.cuh, gemm_4bit.cuh): the mma
// operand type traits, the per-lane code-pair table and the block scale split in two pairs; and the 16-byte
// cp.async of the GEMV's ring.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qlora {

// Element type traits for the mma operand type and the pair LUT.
template <typename T> struct MmaType;

template <> struct MmaType<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  __device__ static Pair pair(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
  __device__ static Pair splat(float x) { return __float2bfloat162_rn(x); }
  __device__ static float round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
  __device__ static float2 unpack(uint32_t bits) { return __bfloat1622float2(*reinterpret_cast<const Pair*>(&bits)); }
  // D = A·B + D, A 16x16 row-major, B 16x8 column-major, fp32 accumulators.
  __device__ static void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <> struct MmaType<__half> {
  using Pair = __half2;
  __device__ static Pair pair(float lo, float hi) { return __floats2half2_rn(lo, hi); }
  __device__ static Pair splat(float x) { return __float2half2_rn(x); }
  __device__ static float round(float x) { return __half2float(__float2half_rn(x)); }
  __device__ static float2 unpack(uint32_t bits) { return __half22float2(*reinterpret_cast<const Pair*>(&bits)); }
  __device__ static void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <typename P>
__device__ __forceinline__ uint32_t as_u32(P p) {
  return *reinterpret_cast<uint32_t*>(&p);
}

// The code table of the tensor-core decoders (gemm_4bit.cuh, lora_gemv_tiled.cuh): row b holds the T pair of byte
// b's two codes (low half: the high nibble) once for each lane, lane l's copy at byte 256·b + 4·l, in bank l, so
// that one PRMT forms a lookup's address and a warp's 32 lookups never conflict. The upper half of each 256-byte
// row is left to other data. value_of(c): code c's value, from memory or (where the kernel loads the values ahead
// with its other start-up loads) by a shuffle from lane c, for which every lane of a warp takes each turn of the loop.
constexpr int kLanePairTableBytes = 256 * 256;
template <typename T, typename ValueOf>
__device__ __forceinline__ void fill_lane_pair_table(uint32_t* table, ValueOf value_of, int tid, int threads) {
  for (int i = tid; i < 256 * 8; i += threads) {  // row b: its first 32 words, 16 bytes a store
    const int b = i / 8;
    const uint32_t v = as_u32(MmaType<T>::pair(value_of(b >> 4), value_of(b & 15)));
    reinterpret_cast<uint4*>(table)[b * 16 + i % 8] = make_uint4(v, v, v, v);
  }
}

// A block scale as two T pairs, hi = T(scale) and lo = T(scale - hi): v·hi + v·lo (one mul, one fma on pairs)
// rounds once, so a decoded weight is within about one rounding of T(value · scale).
template <typename T>
struct SplitScale {
  typename MmaType<T>::Pair hi, lo;
};
template <typename T>
__device__ __forceinline__ SplitScale<T> split_scale(float scale) {
  const float hi = MmaType<T>::round(scale);
  return {MmaType<T>::splat(hi), MmaType<T>::splat(scale - hi)};
}
template <typename T>
__device__ __forceinline__ uint32_t scaled_pair(typename MmaType<T>::Pair v, const SplitScale<T>& s) {
  return as_u32(__hfma2(v, s.hi, __hmul2(v, s.lo)));
}

// 16 bytes global -> shared, asynchronously; the destination as a shared-window address or a generic pointer.
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem);
}

}  // namespace qlora
