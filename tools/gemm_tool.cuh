// What the standalone programs that drive the tensor-core GEMM (gemm_4bit.cuh) share: the parameters of an NF4
// weight with one float absmax per 64 elements and no LoRA term, from device pointers.
#pragma once

#include "qlora/gemm_4bit.cuh"

inline qlora::Gemm4bitParams nf4_gemm_params(const void* x, const uint8_t* packed, const float* absmax, int64_t M,
                                             int64_t N, int64_t K) {
  qlora::Gemm4bitParams p;
  p.x = static_cast<const __nv_bfloat16*>(x);
  p.packed = packed;
  p.scales.absmax = absmax;
  p.M = M;
  p.N = N;
  p.K = K;
  p.log2_blocksize = 6;
  return p;
}
