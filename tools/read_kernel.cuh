// Streaming reads for the standalone programs in tools/: `read_kernel` xors 16-byte loads over a buffer, four in
// flight a thread, with plain loads or with an L2 evict_first cache hint (l2_evict.cu times both).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "qlora/l2_policy.h"

// createpolicy's result as a constant (qlora/l2_policy.h); l2_evict.cu checks that the two agree.
__device__ __forceinline__ uint64_t evict_first_policy() { return qlora::kL2EvictFirst; }

template <bool kEvictFirst>
__device__ __forceinline__ uint4 load16(const void* p, uint64_t policy) {
  uint4 v;
  if constexpr (kEvictFirst)
    asm volatile("ld.global.nc.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(policy));
  else
    v = __ldg(reinterpret_cast<const uint4*>(p));
  return v;
}

constexpr int kUnroll = 4;

template <bool kEvictFirst>
__global__ void __launch_bounds__(256) read_kernel(const uint4* __restrict__ w, int64_t n16, unsigned* out) {
  const uint64_t policy = kEvictFirst ? evict_first_policy() : 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n16; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = i + u * stride < n16 ? load16<kEvictFirst>(w + i + u * stride, policy) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) { acc.x ^= v[u].x; acc.y ^= v[u].y; acc.z ^= v[u].z; acc.w ^= v[u].w; }
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) out[0] = 1;
}
