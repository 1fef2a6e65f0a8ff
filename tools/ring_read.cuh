// A read-only streaming kernel for the standalone programs in tools/: each CTA copies its contiguous share of a
// buffer through a ring of kStages shared-memory stages of kStage bytes by 16-byte cp.async copies (kStages - 1 in
// flight while one is read), as the small-M GEMV feeds its weights. Dynamic shared memory: kStages * kStage bytes.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

template <int kStage, int kStages>
__global__ void ring_read_kernel(const uint8_t* __restrict__ w, int64_t bytes, unsigned* out) {
  extern __shared__ __align__(16) uint8_t ring[];
  const int64_t per_cta = (bytes / gridDim.x + kStage - 1) / kStage * kStage;
  const int64_t begin = blockIdx.x * per_cta, end = bytes < begin + per_cta ? bytes : begin + per_cta;
  const int steps = begin < end ? static_cast<int>((end - begin + kStage - 1) / kStage) : 0;
  auto issue = [&](int s) {
    if (s < steps)
      for (int piece = threadIdx.x; piece < kStage / 16; piece += blockDim.x) {
        const int64_t src = begin + static_cast<int64_t>(s) * kStage + piece * 16;
        const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(ring + (s % kStages) * kStage + piece * 16));
        if (src < end) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(w + src));
      }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  uint32_t acc = 0;
  for (int s = 0; s < steps; ++s) {
    issue(s + kStages - 1);
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 1));
    __syncthreads();
    acc ^= reinterpret_cast<const uint32_t*>(ring + (s % kStages) * kStage)[threadIdx.x % (kStage / 4)];
    __syncthreads();
  }
  if (acc == 0x12345678u) out[0] = 1;
}

// Launches it with its shared memory (asking for more than 48 KB where needed).
template <int kStage, int kStages>
void launch_ring_read(unsigned ctas, unsigned threads, const uint8_t* w, int64_t bytes, unsigned* out) {
  constexpr int kBytes = kStage * kStages;
  if (kBytes > 48 * 1024) cudaFuncSetAttribute(ring_read_kernel<kStage, kStages>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  ring_read_kernel<kStage, kStages><<<ctas, threads, kBytes>>>(w, bytes, out);
}
