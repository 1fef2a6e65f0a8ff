// Shared by the CPU and CUDA translation units: no torch, no CUDA runtime needed on the host side.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD inline
#endif

namespace qlora {

QLORA_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

QLORA_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// |x| as ordered bits: the integer max of these is the float max of |x|, and NaN (whose bits sort above
// +Inf) wins, so a non-finite element poisons its block instead of being silently skipped.
QLORA_HD uint32_t abs_bits(float x) { return float_bits(x) & 0x7fffffffu; }

// a * b + c rounded twice, never contracted into an FMA: bitsandbytes computes these as separate ops,
// and bit-exact dequantization depends on the intermediate rounding.
QLORA_HD float mul_then_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  return a * b + c;  // the host build passes -ffp-contract=off
#endif
}

// Scale that maps a block onto [-1, 1]. An all-zero block gets 0 rather than inf, so its elements
// quantize to the code of 0.0 and dequantize to exact zeros, even after double quantization.
QLORA_HD float inverse_scale(float absmax) { return absmax > 0.0f ? 1.0f / absmax : 0.0f; }

// Layouts the merged-weight kernel (dequantize_lora.cuh) takes: 16 weights of a row then lie in one
// quantization block and start on an aligned 8-byte word. Here, not there, so that host-only code can ask too.
constexpr int64_t kDequantizeLoraMaxRank = 64;
QLORA_HD bool dequantize_lora_supported(int64_t K, int64_t r) {
  return K % 16 == 0 && r >= 1 && r <= kDequantizeLoraMaxRank;
}

// Layouts the fused small-M kernel's block-scaled loop takes: a 256-k step of a row covers four whole blocks.
QLORA_HD bool block_scaled_layout(int64_t blocksize, int64_t K) { return blocksize == 64 && K % 64 == 0; }

}  // namespace qlora
